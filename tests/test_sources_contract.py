"""Contract tests over the source registry: register a source (and add its entry to ``CONTRACTS``
below) and these run it on small real datasets of its format.

Every format must be reopened from its ``spec()``; list its shards in a stable order; give every sample
its bytes, key, label and ``sample_id(scope, key)`` (docs/architecture.md, "Identity and location");
give back the same members by location; and turn a damaged file into a ``SourceError`` or a counted
per-sample status naming the file, never a raw exception, keeping the samples before the damage.
Format-specific cases (spellings, layouts, bad members) stay in test_sources.py.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import shutil
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest

from dataprune.demo import CLASSES, make_demo
from dataprune.errors import SourceError
from dataprune.ids import sample_id
from dataprune.sources import Sample, Shard, Source, detect_format, list_formats, open_source, source_from_spec

N = 24  # samples in every generated dataset


# ----------------------------------------------------------------------------- datasets, per format

@dataclass
class Built:
    """A generated dataset: what to open, and what a correct source must give back."""

    path: str
    truth: list  # (key, label, image bytes) of every sample; keys may repeat across shards
    classes: list | None
    options: dict = field(default_factory=dict)


@dataclass
class DamageCase:
    """One damaged dataset. ``file`` is the damaged file: errors must name it. Samples are named
    ``(file name of loc_path, key)``; those in ``ok`` must come back ok, with the bytes in ``reference``,
    and those in ``counted`` must come back, ok or with a non-ok status. ``after_listing`` damages
    the data between ``list_shards`` and ``iter_samples``."""

    label: str
    path: str
    file: str
    reference: dict  # (file name, key) -> image bytes of every sample that may come back ok
    ok: list = field(default_factory=list)
    counted: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    after_listing: Callable[[], None] | None = None
    must_fail: bool = True  # a shard error or a non-ok sample is expected


@dataclass
class Contract:
    """What a format brings to the contract: generators of clean datasets, the scope of its ids
    (docs/architecture.md: the shard name, or "" for sources whose keys are unique dataset-wide),
    damaged files of that format, and how to damage a location file after listing (for ``fetch``)."""

    generators: dict[str, Callable[..., Built]]  # (root, reference samples, mk) -> Built
    id_scope: str  # "shard" or "dataset"
    damages: Callable[..., list[DamageCase]]  # (root, reference samples, mk) -> cases
    stale: Callable[[str], None]  # damage the file behind a location
    detected: bool = True  # built-in formats are detected from the path; a plug-in is named with format=


def reference(root: Path, mk) -> list:
    """make_demo's samples as (key, label, jpeg bytes), read back by Python's tarfile (not by dataprune)."""
    make_demo(str(root), n=N, shard_size=10, image_size=8, seed=3)
    out = []
    for name in sorted(f for f in os.listdir(root) if f.endswith(".tar")):
        m = mk.read_tar(root / name)
        out += [(n[:-4], int(m[n[:-4] + ".cls"]), m[n]) for n in sorted(m) if n.endswith(".jpg")]
    assert len(out) == N
    return out


def gen_wds(root: Path, ref: list, mk) -> Built:
    make_demo(str(root), n=N, shard_size=10, image_size=8, seed=3)  # 3 shards
    return Built(str(root), list(ref), list(CLASSES))


def gen_wds_gz(root: Path, ref: list, mk) -> Built:
    make_demo(str(root / "plain"), n=N, shard_size=10, image_size=8, seed=3)
    out = root / "gz"
    out.mkdir()
    for name in sorted(os.listdir(root / "plain")):
        data = (root / "plain" / name).read_bytes()
        (out / (name + ".gz" if name.endswith(".tar") else name)).write_bytes(
            gzip.compress(data, mtime=0) if name.endswith(".tar") else data)
    shutil.rmtree(root / "plain")
    return Built(str(out), list(ref), list(CLASSES))


def write_folder(root: Path, ref: list) -> None:
    for key, label, img in ref:
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        (root / CLASSES[label] / f"{key}.jpg").write_bytes(img)
    for c in CLASSES:
        (root / c).mkdir(exist_ok=True)


def gen_folder(root: Path, ref: list, mk) -> Built:
    write_folder(root, ref)
    return Built(str(root), [(f"{CLASSES[lbl]}/{k}", lbl, img) for k, lbl, img in ref], list(CLASSES),
                 {"shard_files": 7})  # 4 virtual shards


def gen_flat(root: Path, ref: list, mk) -> Built:
    root.mkdir()
    for key, _, img in ref:
        (root / f"{key}.jpg").write_bytes(img)
    return Built(str(root), [(k, None, img) for k, _, img in ref], None, {"shard_files": 10})


def gen_hf_parquet(root: Path, ref: list, mk) -> Built:
    root.mkdir()
    mk.hf_parquet(root / "train-00000-of-00002.parquet", ref[:15], CLASSES)
    mk.hf_parquet(root / "train-00001-of-00002.parquet", ref[15:], CLASSES)
    truth = [(f"{i:09d}", lbl, img) for i, (_, lbl, img) in enumerate(ref[:15])]
    truth += [(f"{i:09d}", lbl, img) for i, (_, lbl, img) in enumerate(ref[15:])]  # row keys repeat per file
    return Built(str(root), truth, list(CLASSES))


def gen_columns_parquet(root: Path, ref: list, mk) -> Built:
    root.mkdir()
    path = mk.bytes_parquet(root / "plain.parquet", ref)  # id, picture, target (row groups of 7)
    return Built(path, list(ref), None, {"label_column": "target"})


# ------------------------------------------------------------------------------ damage, per format

def tar_headers(raw: bytes) -> list[tuple[int, int, str]]:
    """(header offset, data end, member name) of every member, read by Python's tarfile."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return [(m.offset, m.offset_data + m.size, m.name) for m in tf.getmembers()]


def sample_ends(raw: bytes) -> list[tuple[str, int, int]]:
    """(key, offset of its first header, end of its last member's data) per sample, in file order."""
    out: list = []
    for off, end, name in tar_headers(raw):
        key = name.split(".", 1)[0]
        if out and out[-1][0] == key:
            out[-1] = (key, out[-1][1], end)
        else:
            out.append((key, off, end))
    return out


def damage_wds(root: Path, ref: list, mk) -> list[DamageCase]:
    make_demo(str(root / "src"), n=8, shard_size=8, image_size=8, seed=5, prefix="bad")
    raw = (root / "src" / "bad-000000.tar").read_bytes()
    ends = sample_ends(raw)
    images = {n[:-4]: data for n, data in mk.read_tar(root / "src" / "bad-000000.tar").items() if n.endswith(".jpg")}
    cases: list[DamageCase] = []

    def case(label: str, payload: bytes, avail: int, gz: bool = False, must_fail: bool = True) -> None:
        d = root / f"c{len(cases)}"
        d.mkdir()
        mk.tar(d / "good.tar", mk.sample("good", 1, ref[0][2]))  # another shard beside it
        name = "bad.tar.gz" if gz else "bad.tar"
        (d / name).write_bytes(payload)
        reference = {(name, k): img for k, img in images.items()} | {("good.tar", "good"): ref[0][2]}
        # samples that end before the damage come back; the last of them may be counted instead of ok
        # (a cut inside the next header cannot tell whether that sample had more members)
        before = [(name, k) for k, _, end in ends if end <= avail]
        cases.append(DamageCase(label, str(d), str(d / name), reference, ok=before[:-1] + [("good.tar", "good")],
                                counted=before[-1:], must_fail=must_fail))

    data_end = ends[-1][2]
    heads = tar_headers(raw)
    for cut in sorted({0, 100, 511, 512} | {off + d for off, _, _ in heads for d in (0, 1, 300, 511, 512, 700)}):
        if cut < data_end:
            case(f"tar cut at byte {cut}", raw[:cut], cut)
    case("tar cut inside the end-of-archive blocks", raw[: data_end + 700], len(raw), must_fail=False)
    for off, _, name in heads:
        start = max(s for _, s, _ in ends if s <= off)  # the sample this header belongs to
        for at, what in ((0, "name"), (124 + 5, "size"), (148 + 2, "checksum"), (257, "magic")):
            b = bytearray(raw)
            b[off + at] ^= 0x55
            case(f"tar {what} byte flipped in the header of {name!r}", bytes(b), start)
    comp = gzip.compress(raw, mtime=0)
    for cut in sorted({10, 40} | {len(comp) * i // 12 for i in range(1, 12)} | {len(comp) - 8, len(comp) - 1}):
        avail = len(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(comp[:cut]))  # what the prefix holds
        case(f"tar.gz cut at byte {cut} of {len(comp)}", comp[:cut], avail, gz=True, must_fail=avail < data_end)
    # Left out (reported instead): a flipped byte inside the gzip stream or its CRC trailer is not noticed.
    return cases


def damage_folder(root: Path, ref: list, mk) -> list[DamageCase]:
    cases: list[DamageCase] = []
    keys = [(f"{k}.jpg", f"{CLASSES[lbl]}/{k}") for k, lbl, _ in ref[:8]]
    reference = {(f"{k}.jpg", f"{CLASSES[lbl]}/{k}"): img for k, lbl, img in ref[:8]}

    d = root / "dangling"
    write_folder(d, ref[:8])
    victim = d / CLASSES[0] / "zz-dangling.jpg"
    os.symlink(d / "no-such-file.jpg", victim)  # listed as an image, cannot be opened
    cases.append(DamageCase("a dangling symlink in place of an image", str(d), str(victim), reference, ok=keys,
                            counted=[("zz-dangling.jpg", f"{CLASSES[0]}/zz-dangling")], options={"shard_files": 3}))
    d = root / "deleted"
    write_folder(d, ref[:8])
    name, key = keys[4]
    gone = d / (key + ".jpg")
    cases.append(DamageCase("an image deleted between listing and reading", str(d), str(gone), reference,
                            ok=[k for k in keys if k != (name, key)], counted=[(name, key)], options={"shard_files": 3},
                            after_listing=gone.unlink))
    return cases


def damage_parquet(root: Path, ref: list, mk) -> list[DamageCase]:
    src = root / "src.parquet"
    mk.hf_parquet(src, ref[:12], CLASSES, row_group_size=3)
    raw = src.read_bytes()
    md = pq.ParquetFile(src).metadata
    footer = len(raw) - 8 - struct.unpack("<I", raw[-8:-4])[0]
    good = {("a-good.parquet", f"{i:09d}"): img for i, (_, _, img) in enumerate(ref[12:])}
    intact = {("b-bad.parquet", f"{i:09d}"): img for i, (_, _, img) in enumerate(ref[:12])}  # rows of undamaged row groups may come back
    cases: list[DamageCase] = []

    def case(label: str, payload: bytes, alone: bool = False) -> None:
        d = root / f"c{len(cases)}"
        d.mkdir()
        if not alone:  # a good file beside it: listing works, reading the bad one fails
            mk.hf_parquet(d / "a-good.parquet", ref[12:], CLASSES, row_group_size=3)
        (d / "b-bad.parquet").write_bytes(payload)
        path = str(d / "b-bad.parquet") if alone else str(d)
        cases.append(DamageCase(label, path, str(d / "b-bad.parquet"), intact if alone else {**good, **intact},
                                ok=[] if alone else list(good)))

    for cut in sorted({0, 3, 4, 100, footer, footer + 50, len(raw) - 8, len(raw) - 4, len(raw) - 1}
                      | {len(raw) * i // 8 for i in range(1, 8)}):
        case(f"parquet cut at byte {cut} of {len(raw)}", raw[:cut])
    case("parquet cut in half, the only file", raw[: len(raw) // 2], alone=True)
    case("parquet without its trailing magic", raw[:-4] + b"XXXX")
    case("parquet with a garbage footer length", raw[:-8] + struct.pack("<I", 1 << 30) + b"PAR1")
    case("parquet with a zeroed footer", raw[:footer] + bytes(len(raw) - 8 - footer) + raw[-8:])
    for g in range(md.num_row_groups):
        for c in range(md.num_columns):
            off = md.row_group(g).column(c).data_page_offset
            for delta in (0, 1, 2, 5):
                b = bytearray(raw)
                b[off + delta] ^= 0xFF
                case(f"parquet page header of row group {g} column {c} flipped at byte {off + delta}", bytes(b))
    return cases


def stale_truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def stale_delete(path: str) -> None:
    os.unlink(path)


def _jsonl_lines(ref: list) -> list[bytes]:
    return [json.dumps({"id": k, "text": f"document {k}: {len(img)} bytes of image {i}"}).encode() for i, (k, _, img) in enumerate(ref)]


def gen_jsonl(root: Path, ref: list, mk) -> Built:
    """Text: one JSON object a line, a plain and a gzip file; a sample's bytes are its line."""
    root.mkdir()
    lines = _jsonl_lines(ref)
    (root / "a.jsonl").write_bytes(b"".join(ln + b"\n" for ln in lines[:15]))
    (root / "b.jsonl.gz").write_bytes(gzip.compress(b"".join(ln + b"\n" for ln in lines[15:]), mtime=0))
    return Built(str(root), [(k, None, ln) for (k, _, _), ln in zip(ref, lines)], None)


def damage_jsonl(root: Path, ref: list, mk) -> list[DamageCase]:
    lines = _jsonl_lines(ref[:12])
    keys = [k for k, _, _ in ref[:12]]
    cases: list[DamageCase] = []

    def case(label: str, name: str, payload: bytes, ok: list, counted: list, reference: dict) -> None:
        d = root / f"c{len(cases)}"
        d.mkdir()
        (d / "a-good.jsonl").write_bytes(b"".join(ln + b"\n" for ln in lines[:3]))
        (d / name).write_bytes(payload)
        good = {("a-good.jsonl", k): ln for k, ln in zip(keys[:3], lines[:3])}
        cases.append(DamageCase(label, str(d), str(d / name), {**good, **reference},
                                ok=list(good) + [(name, k) for k in ok], counted=[(name, k) for k in counted]))

    ref_bad = {("b-bad.jsonl", k): ln for k, ln in zip(keys, lines)}
    for i, (what, bad) in enumerate([("not UTF-8", b'{"id": "x", "text": "caf\xe9"}'), ("not JSON", b'{"id": "x", "text'),
                                     ("not an object", b'["x"]'), ("without its text field", b'{"id": "x"}')]):
        body = lines[:5] + [bad] + lines[5:]
        counted = ["x"] if what == "without its text field" else [f"{6:09d}"]  # an unreadable line is keyed by its number
        case(f"a line {what}", "b-bad.jsonl", b"".join(ln + b"\n" for ln in body), keys, counted, ref_bad)
    raw = b"".join(ln + b"\n" for ln in lines)
    comp = gzip.compress(raw, mtime=0)
    for cut in (10, len(comp) // 2, len(comp) - 8, len(comp) - 1):
        avail = len(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(comp[:cut]))
        ends = [sum(len(ln) + 1 for ln in lines[: i + 1]) for i in range(len(lines))]
        before = [k for k, end in zip(keys, ends) if end <= avail][:-1]  # the line the cut is next to may be lost
        case(f"jsonl.gz cut at byte {cut} of {len(comp)}", "b-bad.jsonl.gz", comp[:cut], before, [],
             {("b-bad.jsonl.gz", k): ln for k, ln in zip(keys, lines)})
    return cases


CONTRACTS: dict[str, Contract] = {
    "wds": Contract({"tar": gen_wds, "tar.gz": gen_wds_gz}, "shard", damage_wds, stale_truncate),
    "folder": Contract({"classes": gen_folder, "flat": gen_flat}, "dataset", damage_folder, stale_delete),
    "parquet": Contract({"hf": gen_hf_parquet, "columns": gen_columns_parquet}, "shard", damage_parquet, stale_truncate),
    "jsonl": Contract({"lines": gen_jsonl}, "shard", damage_jsonl, stale_truncate),
}

CASES = [pytest.param(fmt, v, id=f"{fmt}-{v}") for fmt in list_formats()
         for v in (CONTRACTS[fmt].generators if fmt in CONTRACTS else ["MISSING"])]
FORMATS = [pytest.param(fmt, id=fmt) for fmt in list_formats()]


def contract(fmt: str) -> Contract:
    if fmt not in CONTRACTS:
        pytest.fail(f"source format {fmt!r} is registered but tests/test_sources_contract.py has no CONTRACTS entry "
                    "for it: add a generator of a small dataset, its id scope and damaged files of that format")
    return CONTRACTS[fmt]


@pytest.fixture(scope="module")
def ref(tmp_path_factory, mk) -> list:
    return reference(tmp_path_factory.mktemp("reference"), mk)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, ref, mk):
    """(format, variant) -> Built, generated once per module in a temporary directory (read-only)."""
    cache: dict = {}

    def get(fmt: str, variant: str) -> Built:
        if (fmt, variant) not in cache:
            gen = contract(fmt).generators[variant]
            cache[fmt, variant] = gen(tmp_path_factory.mktemp(f"{fmt}-{variant}".replace(".", "_")) / "data", ref, mk)
        return cache[fmt, variant]

    return get


def open_as(fmt: str, path: str, options: dict) -> Source:
    """Opened as a user would: by path alone for detected formats, with ``format=`` otherwise."""
    return open_source(path, **options) if contract(fmt).detected else open_source(path, fmt, **options)


def opened(b: Built, fmt: str) -> Source:
    return open_as(fmt, b.path, b.options)


def read_all(src: Source) -> dict[str, list[Sample]]:
    """shard name -> its samples; a clean dataset has no shard errors."""
    return {sh.name: list(src.iter_samples(sh)) for sh in src.list_shards()}


def flat(by_shard: dict) -> list[Sample]:
    return [s for samples in by_shard.values() for s in samples]


def fields(s: Sample) -> tuple:
    return (s.shard, s.key, s.sample_id, s.label, s.image, s.image_ext, s.loc_path, s.loc_offset, s.loc_size,
            s.members, s.status, s.error)


# ----------------------------------------------------------------------------------------- registry

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_registered_format_joins_the_contract(fmt):
    c = contract(fmt)
    assert c.generators and c.id_scope in ("shard", "dataset")


def test_no_contract_for_an_unregistered_format():
    assert set(CONTRACTS) <= set(list_formats()), "CONTRACTS names a format that is not registered"


# --------------------------------------------------------------------------------- clean datasets

@pytest.mark.parametrize("fmt, variant", CASES)
def test_detected_and_rebuilt_from_its_spec(datasets, fmt, variant, tmp_path, monkeypatch):
    b = datasets(fmt, variant)
    if contract(fmt).detected:
        assert detect_format(b.path) == fmt
    src = opened(b, fmt)
    assert isinstance(src, Source) and src.format == fmt
    want = read_all(src)
    spec = src.spec()
    assert json.loads(json.dumps(spec)) == spec, "spec() is stored as JSON in table metadata"
    assert spec["format"] == fmt and os.path.isabs(spec["path"])
    # the spec is used from another working directory (a worker, a later command)
    monkeypatch.chdir(tmp_path)
    again = source_from_spec(json.loads(json.dumps(spec)))
    assert type(again) is type(src) and again.format == fmt and again.spec() == spec
    assert again.list_shards() == src.list_shards()
    got = read_all(again)
    assert {k: [fields(s) for s in v] for k, v in got.items()} == {k: [fields(s) for s in v] for k, v in want.items()}
    assert again.classes == src.classes == b.classes
    # opened by a relative path, the spec still records where the data is
    parent, base = os.path.split(b.path)
    monkeypatch.chdir(parent)
    rel = open_as(fmt, base, b.options)
    assert rel.spec()["path"] == os.path.abspath(b.path) == spec["path"]
    assert rel.list_shards() == src.list_shards()


@pytest.mark.parametrize("fmt, variant", CASES)
def test_shards_are_stable_and_add_up_to_the_dataset(datasets, fmt, variant):
    b = datasets(fmt, variant)
    src = opened(b, fmt)
    shards = src.list_shards()
    assert shards and all(isinstance(sh, Shard) for sh in shards)
    assert src.list_shards() == shards == opened(b, fmt).list_shards(), "shard order must be stable"
    assert [sh.index for sh in shards] == list(range(len(shards)))
    assert len({sh.name for sh in shards}) == len(shards), "shard names are unique"
    for sh in shards:
        if sh.size is not None and os.path.isfile(sh.path):
            assert sh.size == os.path.getsize(sh.path)
    seen = 0
    by_shard = read_all(src)
    for sh in shards:
        samples = by_shard[sh.name]
        assert samples, f"shard {sh.name} yields no samples"
        assert all(s.shard == sh.name for s in samples)
        assert all(s.ok for s in samples), [(s.key, s.status, s.error) for s in samples if not s.ok]
        seen += len(samples)
    assert seen == len(b.truth) == N
    assert sorted((s.key, s.label, s.image) for s in flat(by_shard)) == sorted(b.truth, key=lambda t: (t[0], t[1], t[2]))
    assert src.classes == b.classes


@pytest.mark.parametrize("fmt, variant", CASES)
def test_samples_carry_bytes_key_label_and_id(datasets, fmt, variant):
    b = datasets(fmt, variant)
    src = opened(b, fmt)
    samples = flat(read_all(src))
    scope_is_shard = contract(fmt).id_scope == "shard"
    for s in samples:
        assert s.ok and s.error is None
        assert isinstance(s.image, bytes) and s.image, s.key
        assert isinstance(s.key, str) and s.key
        assert s.members.get(s.image_ext) == s.image, f"{s.key}: members[image_ext] is the image"
        if b.classes is not None:
            assert isinstance(s.label, int) and 0 <= s.label < len(b.classes), (s.key, s.label)
        elif s.label is not None:
            assert isinstance(s.label, int) and s.label >= 0
        assert s.sample_id == sample_id(s.shard if scope_is_shard else "", s.key)
        assert isinstance(s.sample_id, int) and 0 <= s.sample_id < 1 << 64
        assert os.path.isabs(s.loc_path) and os.path.exists(s.loc_path)
        assert isinstance(s.loc_offset, int) and isinstance(s.loc_size, int) and s.loc_offset >= 0 and s.loc_size >= 0
    ids = [s.sample_id for s in samples]
    assert len(set(ids)) == len(ids) == N, "sample ids are unique across the dataset"
    first = {(s.shard, s.key): s.sample_id for s in samples}
    assert first == {(s.shard, s.key): s.sample_id for s in flat(read_all(src))}  # the same source, again
    assert first == {(s.shard, s.key): s.sample_id for s in flat(read_all(opened(b, fmt)))}  # a new one


@pytest.mark.parametrize("fmt, variant", CASES)
def test_fetch_by_location_gives_back_the_members(datasets, fmt, variant):
    b = datasets(fmt, variant)
    src = opened(b, fmt)
    samples = flat(read_all(src))
    by_path: dict[str, list[Sample]] = {}
    for s in samples:
        by_path.setdefault(s.loc_path, []).append(s)

    def fetch(path, group):
        got = list(src.fetch(path, iter([(s.key, s.loc_offset, s.loc_size) for s in group])))  # any iterable
        assert [g.key for g in got] == [s.key for s in group]
        for g, s in zip(got, group):
            assert g.members == s.members and s.image in g.members.values(), s.key

    # one row per call, in a shuffled order over the whole dataset
    for s in random.Random(0).sample(samples, len(samples)):
        fetch(s.loc_path, [s])
    for path, group in by_path.items():
        group = sorted(group, key=lambda s: s.loc_offset)
        fetch(path, group)  # a file's rows in one call, sorted by offset (what export does)
        fetch(path, group[1::2])  # rows skipped in between
        # One call out of offset order: either served, or refused with a SourceError naming the file.
        rev = group[::-1]
        try:
            got = list(src.fetch(path, [(s.key, s.loc_offset, s.loc_size) for s in rev]))
        except SourceError as e:
            assert path in str(e) or os.path.basename(path) in str(e)
        else:
            assert [(g.key, g.members) for g in got] == [(s.key, s.members) for s in rev]


# wds-tar.gz is left out here (reported): fetch from a cut .tar.gz raises gzip's raw EOFError.
@pytest.mark.parametrize("fmt, variant", [c for c in CASES if c.values != ("wds", "tar.gz")])
def test_fetch_from_a_changed_file_fails_with_the_file_named(datasets, fmt, variant, tmp_path):
    b = datasets(fmt, variant)
    copy = tmp_path / "copy"
    if os.path.isdir(b.path):
        shutil.copytree(b.path, copy, symlinks=True)
        path = str(copy)
    else:
        copy.mkdir()
        path = shutil.copy(b.path, str(copy / os.path.basename(b.path)))
    src = open_as(fmt, path, b.options)
    samples = flat(read_all(src))
    victim = samples[-1].loc_path
    group = sorted((s for s in samples if s.loc_path == victim), key=lambda s: s.loc_offset)
    contract(fmt).stale(victim)
    got = []
    with pytest.raises(SourceError) as e:
        for g in src.fetch(victim, [(s.key, s.loc_offset, s.loc_size) for s in group]):
            got.append(g)
    assert os.path.basename(victim) in str(e.value)
    # what came back before the error is what was there
    assert [(g.key, g.members) for g in got] == [(s.key, s.members) for s in group[: len(got)]]


# ---------------------------------------------------------------------------------------- damage

def check_damage(fmt: str, case: DamageCase) -> None:
    name = os.path.basename(case.file)
    where = f"{fmt}: {case.label}"

    def named(e: Exception) -> bool:
        return name in str(e) and "Traceback" not in str(e)

    src = open_as(fmt, case.path, case.options)
    try:
        shards = src.list_shards()
    except SourceError as e:
        assert named(e), f"{where}: the error does not name {name}: {e}"
        assert not case.ok and not case.counted, f"{where}: listing failed, losing the samples before the damage: {e}"
        return
    except Exception as e:  # noqa: BLE001 - the contract: nothing else escapes
        pytest.fail(f"{where}: list_shards raised {type(e).__name__}: {e}")
    if case.after_listing:
        case.after_listing()
    samples: list[Sample] = []
    errors: list[SourceError] = []
    for sh in shards:
        try:
            for s in src.iter_samples(sh):
                samples.append(s)
        except SourceError as e:
            errors.append(e)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{where}: iter_samples({sh.name}) raised {type(e).__name__}: {e}")
    for e in errors:
        assert named(e), f"{where}: the shard error does not name {name}: {e}"
    bad = [s for s in samples if not s.ok]
    for s in bad:
        assert isinstance(s.status, str) and s.status not in ("", "ok"), where
        assert s.error and name in s.error and s.key.rsplit("/", 1)[-1] in s.error, f"{where}: {s.key}: {s.error!r}"
        assert s.image is None, f"{where}: {s.key} is skipped ({s.status}) but carries an image"
    if case.must_fail:
        assert errors or bad, f"{where}: the damage went unnoticed"
    ok = {}
    for s in samples:
        if s.ok:
            ident = (os.path.basename(s.loc_path), s.key)
            assert ident in case.reference and s.image == case.reference[ident], f"{where}: {ident} came back ok with other bytes"
            ok[ident] = s
    got = {(os.path.basename(s.loc_path), s.key) for s in samples}
    assert set(case.ok) <= set(ok), f"{where}: lost samples before the damage: {sorted(set(case.ok) - set(ok))}"
    assert set(case.counted) <= got, f"{where}: silently lost {sorted(set(case.counted) - got)}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_files_give_a_named_error_and_keep_what_came_before(fmt, ref, mk, tmp_path):
    cases = contract(fmt).damages(tmp_path, ref, mk)
    assert cases, f"{fmt}: no damage cases"
    for case in cases:
        check_damage(fmt, case)
