"""The score table's directory: is OUT this same job (``check_out``), is it outside the input, what
``init_out`` clears and writes, the names of a run's other files in OUT (resume checkpoints, proxy
weights, the embedding cache, the text pass's arrays) and what a finished run leaves of them
(``finish_artifacts``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..config import ScoreConfig
from ..errors import ConfigError, TableError
from ..scoretable import PART_RE, PARTS_DIR, flat_parts, marker_indices, read_table_meta, write_table_meta
from ..tables import BASE_COLUMNS, DONE_DIR, META_FILE, atomic_write_json

CKPT_DIR = ".train"  # resume checkpoints OUT/.train/run-R.pt: removed when the run completes, unless keep_artifacts
EMBED_DIR = "_embeddings"  # the embedding cache's default root
HASH_CACHE = ".checkpoint-sha256.json"  # the last --checkpoint's hash, by (path, size, mtime_ns, inode, device)
TEXT_DIR = ".text"  # the text pass's per-shard arrays, OUT/.text/<fingerprint>/: removed when the run completes


def check_out(p) -> bool:
    """Validate the output directory (read-only, every rank). True if it holds this same job.
    Metadata that does not parse as ours is not trusted: with nothing scored yet it is rewritten,
    else the table needs --overwrite."""
    cfg = p.cfg
    parts = os.path.join(cfg.out, PARTS_DIR)
    if os.path.islink(parts) or (os.path.lexists(parts) and not os.path.isdir(parts)):
        raise ConfigError(f"{parts} is a link or a file, not the table's own directory of parts; move it away or use another --out")
    if flat_parts(cfg.out) and not cfg.overwrite and os.path.lexists(os.path.join(cfg.out, META_FILE)):
        raise ConfigError(f"{cfg.out} is a score table in dataprune 0.1's layout (parts at its top level), which is read but not "
                          f"written into: to resume it, move its parts first (mkdir {parts} && mv {os.path.join(cfg.out, 'part-')}*.parquet "
                          f"{parts}/), or use --overwrite to score it afresh, or another --out")
    if os.path.lexists(os.path.join(cfg.out, META_FILE)):
        try:
            old, bad = read_table_meta(cfg.out), None
        except TableError as e:
            old, bad = {}, e
        same = bad is None and (old.get("config") == json.loads(json.dumps(p.meta["config"]))
                                and old.get("shard_fingerprint") == p.meta["shard_fingerprint"]
                                and old.get("checkpoint_sha256") == p.meta["checkpoint_sha256"]
                                and old.get("data_fingerprint") == p.meta["data_fingerprint"]
                                and old.get("eval_transform") == p.meta.get("eval_transform"))
        if cfg.overwrite:
            return False
        started = marker_indices(cfg.out) or os.path.isdir(os.path.join(cfg.out, CKPT_DIR))
        if bad is not None and started:
            raise TableError(f"{bad}; use --overwrite to score the table afresh, or another --out")
        if not same and started:
            raise ConfigError(f"{cfg.out} holds scores made with other parameters or data; use --overwrite to replace them, "
                              "or --out for a new table")
        return same
    holds = [d for d in (cfg.out, parts) if os.path.isdir(d) and any(PART_RE.fullmatch(n) for n in os.listdir(d))]
    if holds and not cfg.overwrite:
        raise ConfigError(f"{holds[0]} holds parts without {os.path.join(cfg.out, META_FILE)}; use --overwrite or another --out")
    return False


def check_out_location(p) -> None:
    """--out must not be, or be inside, a directory of the input data (nothing is written there)."""
    p.source.refuse_output_inside(p.cfg.out, [s.path for s in p.shards])


def init_out(p, same: bool) -> None:
    """Rank 0: clear a table made with other parameters (under --overwrite) and write the metadata."""
    cfg = p.cfg
    parts = os.path.join(cfg.out, PARTS_DIR)
    if not same and os.path.isdir(cfg.out):
        for n in os.listdir(cfg.out):
            full = os.path.join(cfg.out, n)
            if (PART_RE.fullmatch(n) or n.startswith(".part-") or re.fullmatch(r"_proxy-run\d+\.safetensors", n)
                    or n in (META_FILE, CKPT_DIR, DONE_DIR)):
                shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.unlink(full)
        for n in os.listdir(parts) if os.path.isdir(parts) else []:  # only our parts: anything else there stays
            if PART_RE.fullmatch(n) and not os.path.isdir(os.path.join(parts, n)):
                os.unlink(os.path.join(parts, n))
    _remove_stale_temps(cfg.out)
    os.makedirs(parts, exist_ok=True)
    write_table_meta(cfg.out, p.meta)
    if p.ckpt_id is not None:
        atomic_write_json(os.path.join(cfg.out, HASH_CACHE), p.ckpt_id)


STALE_TMP = re.compile(r"\.(part-\d{6}\.(parquet|json)|_dataprune\.json)\..+\.tmp")


def _remove_stale_temps(out: str) -> None:
    """Temporary files of a killed run (the run holds OUT's lock, so no other writer owns them)."""
    for d in (out, os.path.join(out, DONE_DIR)):
        if os.path.isdir(d) and not os.path.islink(d):
            for n in os.listdir(d):
                if STALE_TMP.fullmatch(n) and os.path.isfile(os.path.join(d, n)):
                    os.unlink(os.path.join(d, n))


def ckpt_path(out: str, run: int) -> str:
    return os.path.join(out, CKPT_DIR, f"run-{run}.pt")


def proxy_path(out: str, run: int) -> str:
    """The proxy trained by run ``run`` (safetensors; reusable with --checkpoint, e.g. as an encoder)."""
    return os.path.join(out, f"_proxy-run{run}.safetensors")


def embed_root(cfg: ScoreConfig) -> str:
    return cfg.cache_dir or os.path.join(cfg.out, EMBED_DIR)


def text_root(cfg: ScoreConfig, meta: dict) -> str:
    """The text pass's arrays of this job (its config and data): ``OUT/.text/<fingerprint>``."""
    key = {k: meta.get(k) for k in ("config", "shard_fingerprint", "data_fingerprint")}
    return os.path.join(cfg.out, TEXT_DIR, hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16])


def _bytes(path: str) -> int:
    """Bytes of a regular file, or of the regular files under a directory (links are not followed)."""
    if not os.path.isdir(path):
        return os.lstat(path).st_size
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(path) for f in fs
               if not os.path.islink(os.path.join(d, f)))


def finish_artifacts(cfg: ScoreConfig, embed: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """Rank 0, once every part of the table is written: remove the resume checkpoints (unless
    ``keep_artifacts``; only the files this run names, then ``.train`` if that leaves it empty), and
    list what stays beside the table — checkpoints kept, proxy weights, the embedding cache (``embed``:
    the run used one; OUT's default cache is listed whenever it exists) — as ``{path, kind, bytes}``.
    Returns (artifacts, removed paths)."""
    removed = []
    ckdir = os.path.join(cfg.out, CKPT_DIR)
    if not cfg.keep_artifacts and os.path.isdir(ckdir) and not os.path.islink(ckdir):
        for n in sorted(os.listdir(ckdir)):  # the checkpoints, and temporary files of a checkpoint a kill interrupted
            full = os.path.join(ckdir, n)
            if re.fullmatch(r"run-\d+\.pt|\.run-\d+\.pt\..+\.tmp", n) and os.path.isfile(full) and not os.path.islink(full):
                os.unlink(full)
                removed.append(full)
        try:
            os.rmdir(ckdir)
        except OSError:  # not empty: something else is in it, and stays
            pass
    text = os.path.join(cfg.out, TEXT_DIR)
    if not cfg.keep_artifacts and os.path.isdir(text) and not os.path.islink(text):  # the text pass's arrays: ours alone
        shutil.rmtree(text)
        removed.append(text)
    found = [(ckpt_path(cfg.out, r), "checkpoint") for r in range(cfg.runs)] + [(proxy_path(cfg.out, r), "proxy") for r in range(cfg.runs)]
    found += [(text, "text arrays")]
    found += [(d, "embedding cache") for d in dict.fromkeys([os.path.join(cfg.out, EMBED_DIR)] + ([embed_root(cfg)] if embed else []))]
    return [{"path": path, "kind": kind, "bytes": _bytes(path)} for path, kind in found
            if os.path.lexists(path) and not os.path.islink(path)], removed


_FILLS = {np.dtype(np.float32): np.nan, np.dtype(np.int32): -1, np.dtype(np.int64): -1, np.dtype(bool): False}


class PassResult:
    """What a pass over the data left per shard (the embedding cache, the text pass's arrays):
    ``root/base-<index>.parquet`` holds each of the shard's rows, with the pass's global row in
    column ``ROW`` (-1: not taken) — ``columns_all`` is per global row, ``offsets`` the first global
    row of each shard. Subclasses name the field that holds the root directory (``ROOT``)."""

    ROW = ""
    ROOT = ""
    WHAT = ""  # what the root is, for errors
    offsets: dict[int, int]
    columns_all: dict[str, np.ndarray]

    @property
    def root(self) -> str:
        return getattr(self, self.ROOT)

    def base_path(self, sidx: int) -> str:
        return os.path.join(self.root, f"base-{sidx:06d}.parquet")

    def base(self, sidx: int) -> dict[str, list]:
        t = pq.read_table(self.base_path(sidx), columns=BASE_COLUMNS)
        return {c: t.column(c).to_pylist() for c in BASE_COLUMNS}

    def shard_error(self, sidx: int):
        meta = pq.read_schema(self.base_path(sidx)).metadata or {}
        err = json.loads(meta.get(b"dataprune", b"{}")).get("shard_error")
        return tuple(err) if err else None

    def columns(self, sidx: int, nrows: int) -> dict[str, np.ndarray]:
        """The pass's columns for the shard's ``nrows`` rows (fills where a row was not taken)."""
        rows = pq.read_table(self.base_path(sidx), columns=[self.ROW]).column(self.ROW).to_numpy()
        if len(rows) != nrows:
            raise ConfigError(f"{self.WHAT} {self.root}: shard {sidx} has {len(rows)} rows, the data now {nrows}; "
                              f"the dataset changed — remove the {self.WHAT}")
        have = rows >= 0
        g = self.offsets[sidx] + rows[have]
        out = {}
        for name, arr in self.columns_all.items():
            col = np.full(nrows, _FILLS[arr.dtype], arr.dtype)
            col[have] = arr[g]
            out[name] = col
        return out
