"""Tiny generated datasets of every input format, made in ``tmp_path`` (no network, no shared files).

Fixtures
--------
``truth``      the reference samples: key -> (label, jpeg bytes), 24 samples, 10 classes.
``data``       a :class:`Datasets` with one path per spelling/format, all holding ``truth``:
               ``wds_dir`` (3 tar shards + classes.txt), ``wds_brace``, ``wds_list`` (shard-list file),
               ``wds_tar`` (one shard), ``wds_gz`` (a directory of .tar.gz shards), ``folder``
               (``<class>/<key>.jpg``), ``flat`` (unlabelled folder), ``hf_parquet`` (Hugging Face
               layout, 2 files), ``bytes_parquet`` (plain byte/int/str columns).
               Built once per session: treat as read-only (``fresh_data`` gives a private copy).
``mk``         helper writers for hand-made (often broken) inputs: ``mk.tar``, ``mk.jpeg`` ...

A new input format adds a generator here (see docs/architecture.md).
"""

from __future__ import annotations

import filecmp
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune.demo import CLASSES, make_demo
from dataprune.select import SelectConfig, run_select

N = 24
SHARD_SIZE = 10


# ------------------------------------------------------------------------------------ helper writers

def jpeg(seed: int = 0, size: tuple[int, int] = (8, 8), mode: str = "RGB", **save) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def png(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG", **save)
    return buf.getvalue()


def tar_bytes(members, fmt=tarfile.PAX_FORMAT) -> bytes:
    """A tar archive made by Python's tarfile from ``members``: a list of ``(name, bytes)`` for regular
    files or ``(name, TarInfo-kwargs dict)`` for anything else (links, devices, directories)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if isinstance(payload, dict):
                for k, v in payload.items():
                    setattr(info, k, v)
                tf.addfile(info)
            else:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def write_tar(path, members, gz: bool = False) -> str:
    data = tar_bytes(members)
    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(gzip.compress(data, mtime=0) if gz else data)
    return path


def sample_members(key: str, label: int | None, image: bytes | None, ext: str = "jpg") -> list:
    out = []
    if image is not None:
        out.append((f"{key}.{ext}", image))
    if label is not None:
        out.append((f"{key}.cls", str(label).encode()))
    return out


def read_tar_members(path: str) -> dict[str, bytes]:
    """name -> bytes of every regular member, read by Python's tarfile (independent of dataprune)."""
    opener = gzip.open if str(path).endswith((".gz", ".tgz")) else open
    with opener(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}


def write_hf_parquet(path, rows, classes=None, row_group_size: int = 5) -> str:
    """Hugging Face ``datasets`` layout: image struct {bytes, path}, ClassLabel label, metadata."""
    feats = {"image": {"_type": "Image"},
             "label": {"names": classes, "_type": "ClassLabel"} if classes else {"dtype": "int64", "_type": "Value"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={b"huggingface": json.dumps({"info": {"features": feats}}).encode()})
    table = pa.Table.from_pylist([{"image": {"bytes": img, "path": f"{k}.jpg"}, "label": lbl} for k, lbl, img in rows],
                                 schema=schema)
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def write_bytes_parquet(path, rows) -> str:
    """Plain columns: ``id`` (string key), ``picture`` (binary), ``target`` (int)."""
    table = pa.table({"id": [k for k, _, _ in rows], "picture": pa.array([img for _, _, img in rows], pa.binary()),
                      "target": pa.array([lbl for _, lbl, _ in rows], pa.int64())})
    pq.write_table(table, str(path), row_group_size=7)
    return str(path)


def tree_digest(root) -> dict[str, str]:
    """relative path -> sha256 (files) or 'dir'/'link' for everything under ``root``."""
    out = {}
    root = str(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                out[os.path.relpath(p, root)] = "link:" + os.readlink(p)
                continue
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest() + f":{os.stat(p).st_mode:o}"
    return out


def run_cli(*args, cwd=None, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -m dataprune.cli ARGS`` in a real subprocess (no TTY: plain progress lines)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "dataprune.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_cli_inprocess(*args) -> SimpleNamespace:
    """The same command in this process through Typer's runner (fast; for the many error-path checks).
    An exception other than the CLI's own exit would be a traceback for a user: it fails here."""
    from typer.testing import CliRunner

    from dataprune.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


@contextmanager
def file_module(path):
    """Import a file of this repository that is not in a package (an example, a benchmark, another
    test file) under its own name, by path: no reliance on sys.path or pytest's import mode."""
    import importlib.util

    name = "dataprune_file_" + os.path.splitext(os.path.basename(str(path)))[0]
    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def mk():
    """Helper writers as one namespace, so tests need no imports from conftest."""
    return SimpleNamespace(jpeg=jpeg, png=png, tar_bytes=tar_bytes, tar=write_tar, sample=sample_members,
                           read_tar=read_tar_members, hf_parquet=write_hf_parquet, bytes_parquet=write_bytes_parquet,
                           digest=tree_digest, cli=run_cli, cli_fast=run_cli_inprocess, module=file_module)



# ------------------------------------------------------------------------ shared checks (as fixtures)

def select_both(table, tmp_path, limit=1, **kw):
    """Run in memory and streamed; the two manifests must be the same bytes and the summaries equal."""
    kw.setdefault("nan", "drop")
    if "count" not in kw:
        kw.setdefault("frac", 0.5)
    a, b = tmp_path / "mem.parquet", tmp_path / "stream.parquet"
    ra = run_select([table], SelectConfig(**kw), str(a))
    rb = run_select([table], SelectConfig(**kw, memory_limit=limit), str(b))
    assert ra["mode"] == "memory" and rb["mode"] == "stream"
    assert rb["summary"] == ra["summary"]
    assert filecmp.cmp(a, b, shallow=False), "the streamed manifest differs from the in-memory one"
    return ra, rb


@pytest.fixture
def same():
    """``same(table, tmp_path, limit=1, **select options)``: select in memory and streamed (forced by
    ``limit`` bytes); the summaries equal and the manifests the same bytes. Returns both results."""
    return select_both


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


@pytest.fixture
def children():
    """``children(pid)``: the pids of a process's children (Linux ``/proc``; [] where it cannot tell)."""
    return child_pids


# ---------------------------------------------------------------------------------------- datasets

@dataclass
class Datasets:
    root: str
    wds_dir: str
    wds_brace: str
    wds_list: str
    wds_tar: str
    wds_gz: str
    folder: str
    flat: str
    hf_parquet: str
    bytes_parquet: str
    truth: dict  # key -> (label, image bytes)
    classes: list

    def spellings(self) -> dict[str, str]:
        return {"dir": self.wds_dir, "brace": self.wds_brace, "list": self.wds_list}


def build_datasets(root: str) -> Datasets:
    root = str(root)
    wds = os.path.join(root, "wds")
    make_demo(wds, n=N, shard_size=SHARD_SIZE, image_size=8, seed=3)
    shards = sorted(f for f in os.listdir(wds) if f.endswith(".tar"))
    truth: dict[str, tuple[int, bytes]] = {}
    for s in shards:
        m = read_tar_members(os.path.join(wds, s))
        for name, data in m.items():
            if name.endswith(".jpg"):
                key = name[:-4]
                truth[key] = (int(m[key + ".cls"]), data)
    assert len(truth) == N
    brace = os.path.join(wds, f"demo-{{000000..{len(shards) - 1:06d}}}.tar")
    lst = os.path.join(root, "lists", "shards.txt")
    os.makedirs(os.path.dirname(lst))
    with open(lst, "w") as f:  # a mix of absolute and relative lines, a comment and a blank line
        f.write("# shards\n")
        for i, s in enumerate(shards):
            f.write((os.path.join(wds, s) if i % 2 == 0 else os.path.join("..", "wds", s)) + "\n\n")
    gz = os.path.join(root, "wds_gz")
    os.makedirs(gz)
    for s in shards:
        with open(os.path.join(wds, s), "rb") as src:
            with open(os.path.join(gz, s + ".gz"), "wb") as dst:
                dst.write(gzip.compress(src.read(), mtime=0))
    shutil.copy(os.path.join(wds, "classes.txt"), gz)

    folder = os.path.join(root, "folder")
    flat = os.path.join(root, "flat")
    os.makedirs(flat)
    for key, (label, img) in truth.items():
        d = os.path.join(folder, CLASSES[label])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, key + ".jpg"), "wb") as f:
            f.write(img)
        with open(os.path.join(flat, key + ".jpg"), "wb") as f:
            f.write(img)
    for c in CLASSES:  # ImageFolder numbers every class directory, even an empty one
        os.makedirs(os.path.join(folder, c), exist_ok=True)

    rows = [(k, lbl, img) for k, (lbl, img) in sorted(truth.items())]
    hf = os.path.join(root, "hf")
    os.makedirs(hf)
    write_hf_parquet(os.path.join(hf, "train-00000-of-00002.parquet"), rows[:15], CLASSES)
    write_hf_parquet(os.path.join(hf, "train-00001-of-00002.parquet"), rows[15:], CLASSES)
    bp = os.path.join(root, "plain.parquet")
    write_bytes_parquet(bp, rows)
    return Datasets(root=root, wds_dir=wds, wds_brace=brace, wds_list=lst, wds_tar=os.path.join(wds, shards[0]),
                    wds_gz=gz, folder=folder, flat=flat, hf_parquet=hf, bytes_parquet=bp, truth=truth, classes=list(CLASSES))


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Datasets:
    return build_datasets(tmp_path_factory.mktemp("datasets"))


@pytest.fixture
def fresh_data(tmp_path) -> Datasets:
    """A private copy (for tests that check inputs are left unmodified or that damage them)."""
    return build_datasets(tmp_path / "datasets")


@pytest.fixture(scope="session")
def truth(data) -> dict:
    return data.truth
