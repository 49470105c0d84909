"""Fuzz the untrusted-input readers: the tar reader (both its fast and strict paths), the parquet
source and the manifest reader + export, on mutations of valid files (byte flips, cuts, inserted
blocks, spliced headers) and on hostile manifest columns and metadata.

Property for every input: the tool either reads it or raises a DataPruneError (one line for the
user); nothing else escapes, and the tar reader's two paths agree. ``tests/test_fuzz.py`` runs a
bounded, derandomised pass in CI; run this script for a longer one:

    python benchmarks/fuzz_data_plane.py --examples 5000     # per target; prints inputs tried per target
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataprune.errors import DataPruneError

COUNTS: dict[str, int] = {}


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


BASE_TAR = _tar([(f"k{i:02d}.{ext}", _jpeg(i) if ext == "jpg" else str(i % 3).encode())
                 for i in range(6) for ext in ("jpg", "cls")] + [("d/" + "n" * 120 + ".jpg", _jpeg(9))])


def _parquet_bytes() -> bytes:
    t = pa.table({"image": pa.array([{"bytes": _jpeg(i), "path": f"k{i}.jpg"} for i in range(8)],
                                    pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                  "label": pa.array([i % 3 for i in range(8)], pa.int64())})
    buf = io.BytesIO()
    pq.write_table(t, buf, row_group_size=2)
    return buf.getvalue()


BASE_PARQUET = _parquet_bytes()


@st.composite
def mutated(draw, base: bytes):
    """A mutation of ``base``: a few byte flips, then maybe a cut, an inserted run or a copied block."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    op = draw(st.sampled_from(["none", "cut", "insert", "splice"]))
    if op == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif op == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=1100))
    elif op == "splice":  # one 512-byte block copied over another (headers in the wrong place)
        a, b = (draw(st.integers(0, max(0, len(data) // 512 - 1))) * 512 for _ in range(2))
        data[b : b + 512] = data[a : a + 512]
    return bytes(data)


def _read_all(source) -> list:
    out = []
    for shard in source.list_shards():
        try:
            out.extend((s.key, s.status, s.image) for s in source.iter_samples(shard))
        except DataPruneError:
            pass
    return out


def check_tar(data: bytes, tmp: str) -> None:
    """The fast (plain file) and strict (stream) paths yield the same members and the same error."""
    from dataprune import tario

    COUNTS["tar"] = COUNTS.get("tar", 0) + 1
    path = os.path.join(tmp, "x.tar")
    with open(path, "wb") as f:
        f.write(data)

    def run(f):
        got, err = [], None
        try:
            for m, payload in tario.iter_members(f, path):
                got.append((m.name, m.kind, m.size, m.offset, payload))
        except DataPruneError as e:
            err = (type(e).__name__, getattr(e, "reason", None))
        return got, err

    with open(path, "rb") as f:
        fast = run(f)
    strict = run(io.BytesIO(data))  # not a plain file: the strict reader
    assert fast == strict, "tar fast path and strict path disagree"
    from dataprune.sources import open_source

    src = open_source(path, "wds")
    rows = _read_all(src)
    locs = [(s.key, s.loc_offset, s.loc_size) for sh in src.list_shards() for s in _safe_iter(src, sh) if s.ok]
    try:
        list(src.fetch(path, locs))
    except DataPruneError:
        pass
    assert all(isinstance(r[0], str) for r in rows)


def _safe_iter(src, shard):
    try:
        yield from src.iter_samples(shard)
    except DataPruneError:
        return


def check_parquet(data: bytes, tmp: str) -> None:
    from dataprune.sources import open_source

    COUNTS["parquet"] = COUNTS.get("parquet", 0) + 1
    path = os.path.join(tmp, "x.parquet")
    with open(path, "wb") as f:
        f.write(data)
    try:
        src = open_source(path, "parquet")
    except DataPruneError:
        return
    try:
        _read_all(src)
    except DataPruneError:
        pass


COLUMN_VALUES = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.none(),
    st.binary(max_size=10), st.booleans())
MANIFEST_COLUMNS = ["sample_id", "shard", "key", "label", "loc_path", "loc_offset", "loc_size"]


@st.composite
def hostile_manifest(draw, good: pa.Table):
    """A manifest of the dataset whose columns, types or metadata an adversary chose in part."""
    cols = {c: good.column(c).to_pylist() for c in good.column_names}
    for c in draw(st.lists(st.sampled_from(MANIFEST_COLUMNS), max_size=3, unique=True)):
        how = draw(st.sampled_from(["values", "drop", "type"]))
        if how == "drop":
            cols.pop(c, None)
        elif how == "type":
            cols[c] = [str(v) for v in cols[c]]
        else:
            i = draw(st.integers(0, good.num_rows - 1))
            cols[c][i] = draw(COLUMN_VALUES)
    arrays = {}
    for c, v in cols.items():
        try:
            arrays[c] = pa.array(v)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            arrays[c] = pa.array([repr(x) for x in v])
    meta = json.loads(good.schema.metadata[b"dataprune"])
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(meta)))
        meta[key] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=2)))
    raw = json.dumps(meta).encode() if draw(st.integers(0, 9)) else draw(st.binary(max_size=30))
    return pa.table(arrays).replace_schema_metadata({b"dataprune": raw})


def check_manifest(table: pa.Table, tmp: str) -> None:
    from dataprune.export import ExportConfig, export

    COUNTS["manifest"] = COUNTS.get("manifest", 0) + 1
    path = os.path.join(tmp, "m.parquet")
    pq.write_table(table, path)
    out = tempfile.mkdtemp(dir=tmp)  # a fresh --out each time: one input's leftovers must not decide the next
    try:
        export(path, ExportConfig(out=out))
        COUNTS["manifest exported"] = COUNTS.get("manifest exported", 0) + 1
    except DataPruneError as e:
        key = f"manifest {type(e).__name__}"
        COUNTS[key] = COUNTS.get(key, 0) + 1


def good_manifest(tmp: str) -> pa.Table:
    from dataprune.manifest import build_manifest

    data = os.path.join(tmp, "data")
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(data, "a.tar"), "wb") as f:
        f.write(BASE_TAR)
    build_manifest(data, os.path.join(tmp, "good.parquet"))
    return pq.read_table(os.path.join(tmp, "good.parquet"))


def run(examples: int, derandomize: bool = True) -> dict[str, int]:
    """Fuzz each target with ``examples`` inputs; returns inputs tried per target."""
    opts = settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
                    suppress_health_check=list(HealthCheck))
    COUNTS.clear()
    with tempfile.TemporaryDirectory() as tmp:
        given(mutated(BASE_TAR))(opts(lambda data: check_tar(data, tmp)))()
        given(mutated(BASE_PARQUET))(opts(lambda data: check_parquet(data, tmp)))()
        good = good_manifest(tmp)
        given(hostile_manifest(good))(opts(lambda t: check_manifest(t, tmp)))()
    return dict(COUNTS)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000, help="inputs per target")
    ap.add_argument("--random", action="store_true", help="a new random stream (default: derandomised, reproducible)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    counts = run(a.examples, derandomize=not a.random)
    total = sum(v for k, v in counts.items() if k in ("tar", "parquet", "manifest"))
    print(f"fuzzed {total} inputs in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()) + " — no exception other than DataPruneError escaped")
