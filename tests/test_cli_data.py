"""The data-plane commands (demo, info, manifest, export) through real subprocesses."""

from __future__ import annotations

import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest


def no_traceback(r):
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    return r


def error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), r.stderr
    return lines[-1]


def test_demo_info_manifest_export(tmp_path, mk):
    d = tmp_path / "demo"
    r = no_traceback(mk.cli("demo", d, "--samples", 60, "--shard-size", 25))
    assert r.returncode == 0 and sorted(os.listdir(d)) == ["classes.txt", "demo-000000.tar", "demo-000001.tar", "demo-000002.tar"]
    r = no_traceback(mk.cli("info", d, "--json", "--check", "--strict"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["format"], info["shards"], info["samples"], info["ok"], info["skipped"]) == ("wds", 3, 60, 60, 0)
    assert info["checked"] and sum(c["count"] for c in info["classes"]) == 60
    assert [c["name"] for c in info["classes"]][:1] == ["0-red-disc"]
    assert [s["samples"] for s in info["per_shard"]] == [25, 25, 10]
    r = no_traceback(mk.cli("info", d))  # the rich table, no TTY
    assert r.returncode == 0 and "samples" in r.stdout and "60" in r.stdout
    m = tmp_path / "m.parquet"
    r = no_traceback(mk.cli("manifest", d, "--out", m))
    assert r.returncode == 0 and "wrote 60 rows" in r.stdout
    out = tmp_path / "out"
    r = no_traceback(mk.cli("export", m, "--to", "wds", "--out", out, "--shard-size", 40, "--json"))
    assert r.returncode == 0, r.stderr
    idx = json.loads(r.stdout)
    assert idx["samples"] == 60 and [f["samples"] for f in idx["files"]] == [40, 20]
    assert json.load(open(out / "index.json"))["files"] == idx["files"]
    r = no_traceback(mk.cli("export", d, "--to", "parquet", "--out", tmp_path / "pq"))
    assert r.returncode == 0 and "exported 60 samples" in r.stdout


def test_info_on_every_format(data, mk):
    for path, extra, n in ((data.folder, [], 24), (data.hf_parquet, [], 24), (data.wds_gz, [], 24),
                           (data.wds_brace, [], 24), (data.wds_list, [], 24), (data.flat, ["--shard-files", 5], 24),
                           (data.bytes_parquet, ["--image-column", "picture", "--label-column", "target"], 24)):
        r = no_traceback(mk.cli_fast("info", path, "--json", *extra))
        assert r.returncode == 0, (path, r.stderr)
        assert json.loads(r.stdout)["samples"] == n


@pytest.fixture
def broken(tmp_path, mk):
    """One good shard plus one shard per kind of bad input."""
    d = tmp_path / "broken"
    mk.tar(d / "a-good.tar", mk.sample("g1", 1, mk.jpeg(1)) + mk.sample("g2", 2, mk.jpeg(2)))
    return d


BAD = {
    "truncated": ("truncated_tar", "x.tar"),
    "zero_byte": ("not_tar", "x.tar"),
    "not_tar": ("not_tar", "x.tar"),
    "absolute": ("unsafe_name", "/abs/evil.jpg"),
    "dotdot": ("unsafe_name", "../evil.jpg"),
    "symlink": ("not_regular_file", "sym.jpg"),
    "hardlink": ("not_regular_file", "hard.jpg"),
    "device": ("not_regular_file", "dev.jpg"),
    "duplicate": ("duplicate_key", "k.jpg"),
    "no_image": ("no_image", "'lonely'"),
}


def make_bad(d, mk, case):
    ok = mk.sample("k", 3, mk.jpeg(3))
    if case == "truncated":
        raw = mk.tar_bytes(ok + mk.sample("k2", 1, mk.jpeg(4, size=(32, 32))))
        (d / "x.tar").write_bytes(raw[: raw.index(b"k2.jpg") + 700])
    elif case == "zero_byte":
        (d / "x.tar").write_bytes(b"")
    elif case == "not_tar":
        (d / "x.tar").write_bytes(b"<html>not found</html>\n" * 50)
    else:
        bad = {
            "absolute": [("/abs/evil.jpg", mk.jpeg(5))],
            "dotdot": [("../evil.jpg", mk.jpeg(5))],
            "symlink": [("sym.jpg", {"type": tarfile.SYMTYPE, "linkname": "/etc/shadow"})],
            "hardlink": [("hard.jpg", {"type": tarfile.LNKTYPE, "linkname": "k.jpg"})],
            "device": [("dev.jpg", {"type": tarfile.BLKTYPE, "devmajor": 8, "devminor": 0})],
            "duplicate": [("k.jpg", mk.jpeg(6))],  # k.jpg again, right after k.cls
            "no_image": [("lonely.txt", b"words"), ("lonely.cls", b"1")],
        }[case]
        mk.tar(d / "x.tar", ok + bad + mk.sample("z", 0, mk.jpeg(7)))


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raise_and_skip(broken, tmp_path, mk, case):
    from dataprune.errors import SourceError
    from dataprune.export import ExportConfig, export
    from dataprune.info import dataset_info
    from dataprune.manifest import build_manifest

    reason, member = BAD[case]
    make_bad(broken, mk, case)
    before = mk.digest(broken)
    # --on-error raise: one line naming the file and member, non-zero exit, no traceback
    r = no_traceback(mk.cli_fast("export", broken, "--out", tmp_path / "o1", "--on-error", "raise"))
    assert r.returncode == 3, r.stderr
    line = error_line(r)
    assert str(broken / "x.tar") in line and member in line, line
    assert not (tmp_path / "o1" / "index.json").exists()
    with pytest.raises(SourceError) as e:  # the same through the library, for the manifest command
        build_manifest(str(broken), str(tmp_path / "m1.parquet"), on_error="raise")
    assert str(broken / "x.tar") in str(e.value) and member in str(e.value)
    assert not (tmp_path / "m1.parquet").exists()
    # default (skip): counted by reason; seen = kept + skipped for every shard
    idx = export(str(broken), ExportConfig(out=str(tmp_path / "o2")))
    shard_reasons = {e["reason"] for e in idx["shard_errors"]}
    assert reason in set(idx["skipped"]) | shard_reasons
    for name, c in idx["shards"].items():
        assert c["seen"] == c["kept"] + c["skipped"], name
    assert idx["shards"]["a-good.tar"] == {"seen": 2, "kept": 2, "skipped": 0}
    assert idx["samples"] == sum(c["kept"] for c in idx["shards"].values())
    assert sum(idx["skipped"].values()) == sum(c["skipped"] for c in idx["shards"].values())
    if case not in ("truncated", "zero_byte", "not_tar"):
        assert idx["skipped"] == {reason: 1} and idx["shards"]["x.tar"]["kept"] == (1 if case == "duplicate" else 2)
    # info: the same counts, and any problem makes --strict fail
    info = dataset_info(str(broken))
    assert info["samples"] == info["ok"] + info["skipped"] and info["ok"] == idx["samples"]
    assert sum(info["problems"].values()) == info["skipped"]
    assert info["skipped"] or info["shard_errors"]
    assert all(row["samples"] == row["ok"] + row["skipped"] for row in info["per_shard"])
    assert mk.digest(broken) == before  # inputs never modified


def test_strict_and_raise_through_real_processes(broken, tmp_path, mk):
    for case in ("truncated", "dotdot"):
        make_bad(broken, mk, case)
        r = no_traceback(mk.cli("info", broken, "--strict"))
        assert r.returncode == 6 and "problem" in error_line(r), r.stderr
        r = no_traceback(mk.cli("manifest", broken, "--out", tmp_path / "m.parquet", "--on-error", "raise"))
        assert r.returncode == 3 and str(broken / "x.tar") in error_line(r)
    make_bad(broken, mk, "symlink")
    r = no_traceback(mk.cli("export", broken, "--out", tmp_path / "o", "--on-error", "raise"))
    assert r.returncode == 3 and "sym.jpg" in error_line(r) and str(broken / "x.tar") in error_line(r)
    r = no_traceback(mk.cli("manifest", broken, "--out", tmp_path / "m.parquet"))  # written, but a sample is left out: exit 8
    assert r.returncode == 8 and "skipped not_regular_file=1" in r.stdout and "not_regular_file=1" in error_line(r)
    assert pq.read_table(tmp_path / "m.parquet").num_rows == 4
    r = no_traceback(mk.cli("manifest", broken, "--out", tmp_path / "m.parquet", "--allow-missing"))
    assert r.returncode == 0 and "skipped not_regular_file=1" in r.stdout
    os.unlink(broken / "x.tar")
    assert no_traceback(mk.cli("info", broken, "--strict")).returncode == 0


def test_corrupt_image_found_by_check(broken, tmp_path, mk):
    good = mk.jpeg(9, size=(32, 32))
    mk.tar(broken / "x.tar", mk.sample("fine", 1, good) + mk.sample("cut", 2, good[: len(good) // 2])
           + mk.sample("junk", 3, b"\xff\xd8\xff garbage") + mk.sample("big", 4, mk.jpeg(3, size=(64, 64))))
    r = no_traceback(mk.cli_fast("info", broken, "--json"))  # without --check: bytes are not decoded
    assert json.loads(r.stdout)["skipped"] == 0
    r = no_traceback(mk.cli_fast("info", broken, "--json", "--check", "--max-pixels", 4000))
    info = json.loads(r.stdout)
    assert r.returncode == 0 and info["problems"] == {"decode_error": 2, "too_large": 1}
    assert any("'cut'" in e and "x.tar" in e for e in info["problem_examples"])
    r = no_traceback(mk.cli("info", broken, "--check", "--strict"))
    assert r.returncode == 6
    assert "decode_error=2" in error_line(r)


def test_parquet_without_footer(data, tmp_path, mk):
    d = tmp_path / "pq"
    d.mkdir()
    good = pq.read_table(os.path.join(data.hf_parquet, "train-00001-of-00002.parquet"))
    pq.write_table(good, d / "a.parquet")
    raw = open(os.path.join(data.hf_parquet, "train-00000-of-00002.parquet"), "rb").read()
    (d / "b.parquet").write_bytes(raw[:-100])
    r = no_traceback(mk.cli("export", d, "--out", tmp_path / "o", "--on-error", "raise"))
    assert r.returncode == 3 and "b.parquet" in error_line(r)
    r = no_traceback(mk.cli_fast("export", d, "--out", tmp_path / "o", "--json"))
    idx = json.loads(r.stdout)  # the export is complete and described, and the lost shard makes it exit 8
    assert r.returncode == 8 and idx["samples"] == 9 and "b.parquet: bad_parquet" in error_line(r)
    r = no_traceback(mk.cli_fast("export", d, "--out", tmp_path / "o", "--json", "--allow-missing"))
    assert r.returncode == 0 and {**json.loads(r.stdout), "seconds": None, "processes": None} == {**idx, "seconds": None, "processes": None}
    assert [(e["shard"], e["reason"]) for e in idx["shard_errors"]] == [("b.parquet", "bad_parquet")]
    r = no_traceback(mk.cli_fast("info", d / "b.parquet"))
    assert r.returncode == 3 and "b.parquet" in error_line(r)


@pytest.mark.parametrize("args, code, text", [
    (["info", "pipe:curl http://x/a.tar"], 2, "pipe:"),
    (["info", "/no/such/dir"], 3, "/no/such/dir"),
    (["info", "DATA", "--format", "zip"], 2, "unknown format"),
    (["export", "DATA", "--to", "zip", "--out", "OUT"], 2, "--to"),
    (["export", "DATA", "--out", "DATA/inside"], 2, "inside the input"),
    (["export", "/no/such/manifest.parquet"], 2, "no such file"),
    (["export", "DATA", "--shard-size", "0", "--out", "OUT"], 2, "--shard-size"),
    (["manifest", "DATA", "--keys", "/no/keys.csv", "--out", "OUT/m.parquet"], 2, "--keys"),
    (["export", "DATA", "--out", "/proc/dataprune-cannot-write-here"], 1, "/proc/dataprune-cannot-write-here"),
])
def test_errors_are_one_line(data, tmp_path, mk, args, code, text):
    args = [a.replace("DATA", data.wds_dir).replace("OUT", str(tmp_path / "out")) for a in args]
    real = args[0] == "info"  # a few in real processes, the rest in-process (same code path, faster)
    r = no_traceback(mk.cli(*args) if real else mk.cli_fast(*args))
    assert r.returncode == code, r.stderr
    assert text in error_line(r)


def test_manifest_from_keys_csv(data, tmp_path, mk):
    keys = sorted(data.truth)[:5]
    (tmp_path / "keys.csv").write_text("key\n" + "\n".join(keys) + "\n")
    m = tmp_path / "m.parquet"
    r = no_traceback(mk.cli("manifest", data.wds_dir, "--keys", tmp_path / "keys.csv", "--out", m))
    assert r.returncode == 0 and "wrote 5 rows" in r.stdout
    assert sorted(pq.read_table(m).column("key").to_pylist()) == keys
    r = no_traceback(mk.cli_fast("export", m, "--to", "list", "--out", tmp_path / "o"))
    assert r.returncode == 0
    assert sorted(ln.split("\t")[1] for ln in open(tmp_path / "o" / "keys.txt").read().splitlines()) == keys


def test_gz_and_folder_export_via_cli(data, tmp_path, mk):
    r = no_traceback(mk.cli("export", data.wds_gz, "--to", "folder", "--out", tmp_path / "f", "--json"))
    assert r.returncode == 0 and json.loads(r.stdout)["samples"] == 24
    assert len([f for _, _, fs in os.walk(tmp_path / "f") for f in fs if f.endswith(".jpg")]) == 24
