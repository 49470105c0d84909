"""Text sources: JSON Lines (plain and gzip), parquet text columns, WebDataset .txt/.json members —
identity, location, bad lines as counted skips naming file and line, and export byte for byte."""

from __future__ import annotations

import glob
import gzip
import io
import json
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune.config import ExportConfig
from dataprune.errors import ConfigError, SourceError
from dataprune.export import export
from dataprune.ids import sample_id
from dataprune.sources import detect_format, open_source

DOCS = [f"document {i} " + "lorem ipsum " * (i % 5) + "é ünïcode\ttabs" for i in range(30)]


def write_jsonl(path, rows, gz=False):
    data = b"".join((json.dumps(r, ensure_ascii=False).encode() if isinstance(r, dict) else r) + b"\n" for r in rows)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return data


def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"id": f"a{i}", "text": t, "meta": {"n": i}} for i, t in enumerate(DOCS[:12])])
    write_jsonl(d / "b.jsonl.gz", [{"id": f"b{i}", "text": t} for i, t in enumerate(DOCS[12:24])], gz=True)
    write_jsonl(d / "c.json.gz", [{"text": t} for t in DOCS[24:]], gz=True)  # no id: line numbers
    return d


def test_jsonl_is_detected_and_gives_every_line_with_its_id_and_location(tmp_path):
    d = corpus(tmp_path)
    assert detect_format(str(d)) == "jsonl" and detect_format(str(d / "a.jsonl")) == "jsonl"
    src = open_source(str(d))
    shards = src.list_shards()
    assert [s.name for s in shards] == ["a.jsonl", "b.jsonl.gz", "c.json.gz"]
    samples = [s for sh in shards for s in src.iter_samples(sh)]
    assert [s.text for s in samples] == DOCS and all(s.ok for s in samples)
    assert [s.key for s in samples[24:]] == [f"{n:09d}" for n in range(1, 7)]  # line numbers
    assert samples[0].key == "a0" and samples[0].sample_id == sample_id("a.jsonl", "a0")
    raw = (d / "a.jsonl").read_bytes()
    for s in samples[:12]:
        assert raw[s.loc_offset: s.loc_offset + s.loc_size] == s.image == s.members["json"]
    for sh in shards:  # fetch gives back each line's bytes, from plain and gzip files
        mine = [s for s in samples if s.shard == sh.name]
        got = list(src.fetch(sh.path, [(s.key, s.loc_offset, s.loc_size) for s in mine]))
        assert [g.members for g in got] == [s.members for s in mine]


def test_bad_lines_are_counted_skips_naming_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    write_jsonl(p, [{"id": 1, "text": "fine"}, b'{"id": 2, "text": "caf\xe9"}', b"{not json", b"[1, 2]",
                    {"id": 5, "body": "no text field"}, {"id": 1, "text": "repeated id"}, {"id": [1], "text": "list id"},
                    {"id": "../x", "text": "unsafe"}, b"   ", {"id": 9, "text": 7}, {"id": 10, "text": "last"}])
    src = open_source(str(p))
    samples = list(src.iter_samples(src.list_shards()[0]))
    got = [(s.status, s.key) for s in samples]
    assert got == [("ok", "1"), ("bad_utf8", "000000002"), ("bad_json", "000000003"), ("bad_json", "000000004"),
                   ("no_text", "5"), ("duplicate_key", "1"), ("bad_key", "000000007"), ("unsafe_name", "../x"),
                   ("no_text", "9"), ("ok", "10")]  # the blank line 9 is not a document
    for s in samples:
        if not s.ok:
            assert str(p) in s.error and "line " in s.error
            assert s.image is None and s.text is None
    assert "line 2" in samples[1].error and "line 5" in samples[4].error
    src = open_source(str(p), text_column="body")  # --text-column
    assert [s.status for s in src.iter_samples(src.list_shards()[0])][4] == "ok"


def test_surrogates_are_bad_utf8_skips_not_a_crash(tmp_path):
    """json.loads accepts UTF-8-encoded surrogates (its 'surrogatepass') and ``\\ud800`` escapes; neither
    is Unicode text (nothing can hash, export or write it), so both are counted skips naming the line."""
    d = tmp_path / "c"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [b"\xef\xbb\xbf" + json.dumps({"id": 0, "text": "bom first line"}).encode(),
                                b'{"id": 1, "text": "raw \xed\xa0\x80 surrogate"}', b'{"id": 2, "text": "escaped \\ud800"}',
                                b'{"id": 3, "text": "fine"}', b'{"id": "\\udcff", "text": "surrogate key"}'])
    src = open_source(str(d))
    got = [(s.status, s.key) for s in src.iter_samples(src.list_shards()[0])]
    assert got == [("ok", "0"), ("bad_utf8", "000000002"), ("bad_utf8", "2"), ("ok", "3"), ("ok", "\\xff")]  # a key is escaped
    r = subprocess.run([sys.executable, "-m", "dataprune", "score", str(d), "--metric", "text-dedup,text-substr",
                        "--workers", "0", "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "skipped bad_utf8=2" in r.stdout


def test_a_cut_gzip_file_keeps_the_lines_before_and_names_the_file(tmp_path):
    data = gzip.compress(b"".join(json.dumps({"id": i, "text": "x " * 200}).encode() + b"\n" for i in range(200)), mtime=0)
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    src = open_source(str(p))
    got = []
    with pytest.raises(SourceError) as e:
        for s in src.iter_samples(src.list_shards()[0]):
            got.append(s)
    assert "cut.jsonl.gz" in str(e.value) and len(got) > 10 and all(s.ok for s in got[:-1])


def test_a_stale_location_is_refused_with_the_file_named(tmp_path):
    p = tmp_path / "a.jsonl"
    write_jsonl(p, [{"id": i, "text": f"t{i}"} for i in range(5)])
    src = open_source(str(p))
    s = list(src.iter_samples(src.list_shards()[0]))[2]
    with pytest.raises(SourceError, match="a.jsonl") as e:
        list(src.fetch(str(p), [(s.key, s.loc_offset + 1, s.loc_size)]))
    assert e.value.reason == "stale_location"
    lines = p.read_bytes().split(b"\n")
    lines[1], lines[2] = lines[2], lines[1]  # two lines of the same length change places: another document there
    p.write_bytes(b"\n".join(lines))
    with pytest.raises(SourceError, match="key") as e:
        list(src.fetch(str(p), [(s.key, s.loc_offset, s.loc_size)]))
    assert e.value.reason == "stale_location"


def test_parquet_text_column_and_wds_text_members(tmp_path):
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(6)], "text": DOCS[:5] + [None]}), tmp_path / "t.parquet")
    src = open_source(str(tmp_path / "t.parquet"))
    samples = list(src.iter_samples(src.list_shards()[0]))
    assert src.modality == "text" and [s.text for s in samples[:5]] == DOCS[:5] and samples[0].key == "p0"
    assert samples[5].status == "no_text" and "row 5" in samples[5].error
    with pytest.raises(ConfigError, match="--text-column"):
        open_source(str(tmp_path / "t.parquet"), text_column="body").list_shards()
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in [("x.txt", DOCS[0].encode()), ("y.json", json.dumps({"text": DOCS[1]}).encode()),
                           ("z.txt", b"\xff\xfe bad"), ("w.json", b'{"other": 1}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    src = open_source(str(tar), text_column="text")
    samples = list(src.iter_samples(src.list_shards()[0]))
    assert [s.status for s in samples] == ["ok", "ok", "bad_utf8", "no_text"]
    assert [s.text for s in samples[:2]] == DOCS[:2] and "'z'" in samples[2].error
    plain = open_source(str(tar))  # an image dataset's rule is unchanged: no image is no_image
    assert [s.status for s in plain.iter_samples(plain.list_shards()[0])][0] == "no_image"


def test_an_empty_parquet_document_is_a_document(tmp_path):
    """An empty string is an (empty) document, as in JSON Lines: exported as text, not as an image member."""
    docs = ["one", "", "three"]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": docs}), tmp_path / "in" / "t.parquet")
    src = open_source(str(tmp_path / "in" / "t.parquet"))
    assert [(s.status, s.text, s.members) for s in src.iter_samples(src.list_shards()[0])][1] == ("ok", "", {"txt": b""})
    _export(str(tmp_path / "in" / "t.parquet"), "jsonl", tmp_path / "j")
    lines = [json.loads(ln) for f in sorted(glob.glob(str(tmp_path / "j" / "*.jsonl"))) for ln in open(f, "rb").read().split(b"\n") if ln]
    assert lines == [{"id": k, "text": t} for k, t in zip("abc", docs)]
    _export(str(tmp_path / "in" / "t.parquet"), "parquet", tmp_path / "p")
    assert [t for f in sorted(glob.glob(str(tmp_path / "p" / "*.parquet"))) for t in pq.read_table(f).column("text").to_pylist()] == docs


def _export(src_path, to, out, **opts):
    r = export(src_path, ExportConfig(to=to, out=str(out), shard_size=7), source_options=opts or None)
    assert r["samples"] > 0, r
    return r


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "wds"])
def test_every_text_format_round_trips_through_export_byte_for_byte(tmp_path, fmt):
    d = corpus(tmp_path)
    src = open_source(str(d))
    want = [s.image for sh in src.list_shards() for s in src.iter_samples(sh)]  # each line as it is in its file
    _export(str(d), fmt, tmp_path / "out")
    if fmt == "jsonl":
        lines = [ln for f in sorted(glob.glob(str(tmp_path / "out" / "*.jsonl"))) for ln in open(f, "rb").read().split(b"\n") if ln]
        assert lines == want
        return
    back = open_source(str(tmp_path / "out"), text_column="text")
    got = [(s.text, s.image) for sh in back.list_shards() for s in back.iter_samples(sh)]
    texts = [json.loads(w)["text"] for w in want]
    if fmt == "wds":  # the .json members are the lines, byte for byte
        assert [g[1] for g in got] == want
    assert [g[0] for g in got] == texts
    _export(str(tmp_path / "out"), fmt, tmp_path / "again", text_column="text")  # and that export exports again unchanged
    again = open_source(str(tmp_path / "again"), text_column="text")
    assert [(s.text, s.image) for sh in again.list_shards() for s in again.iter_samples(sh)] == got


def test_cli_counts_bad_lines_and_refuses_a_missing_text_column_in_one_line(tmp_path):
    import subprocess
    import sys

    d = tmp_path / "c"
    d.mkdir()
    (tmp_path / "pq").mkdir()
    write_jsonl(d / "a.jsonl", [{"id": 1, "text": "one two three"}, b"{broken", b'{"id": 3, "text": "caf\xe9"}', {"id": 4}])
    pq.write_table(pa.table({"id": ["a", "b"], "body": pa.array([b"fine text", b"\xff bad"], pa.binary())}), d.parent / "pq" / "t.parquet")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dataprune", *map(str, args)], capture_output=True, text=True, timeout=120)

    r = cli("score", d, "--metric", "text-dedup", "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    assert "skipped bad_json=1, bad_utf8=1, no_text=1" in r.stdout
    r = cli("score", tmp_path / "pq" / "t.parquet", "--metric", "text-substr", "--out", tmp_path / "s2")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "t.parquet" in r.stderr and "--text-column" in r.stderr
    r = cli("score", tmp_path / "pq" / "t.parquet", "--metric", "text-substr", "--text-column", "body", "--out", tmp_path / "s2")
    assert r.returncode == 0 and "skipped bad_utf8=1" in r.stdout, r.stderr
    r = cli("select", tmp_path / "s2", "--by", "dup_span_frac", "--frac", "1", "--out", tmp_path / "m.parquet")
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "m.parquet", "--to", "jsonl", "--out", tmp_path / "e")  # fetched from the binary column
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "e" / "pruned-000000.jsonl").read_bytes() == b'{"id": "a", "text": "fine text"}\n'
