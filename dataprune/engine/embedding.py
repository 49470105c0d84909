"""Embedding metrics: prototypes, class prototypes and duplicates.

1. **Embed** every shard once with an encoder (pooled features, classifier removed), L2-normalised,
   cached per shard as float16 in ``OUT/_embeddings/<fingerprint>/`` together with the shard's
   base rows and blake2b-64 hashes of each image's bytes and decoded pixels. The fingerprint covers
   the encoder (model, weights hash, image size, normalisation) and the dataset, so reruns and the
   other embedding metrics reuse the cache; ``--cache-dir`` shares it between score tables.
2. **Global steps**, each rank over the rows of its own shards, streamed from the cache
   (``engine.sharded``): spherical k-means across the ranks (fit on the ``--kmeans-sample`` rows
   chosen by hash of ``sample_id``, sums all-reduced), every rank assigning its own rows; class
   means from all-reduced sums; SemDeDup with every cluster on one owner rank, in block tiles.
   One process is a job of one, so the table does not depend on the world size.
3. The per-row results are handed to the engine, which writes them into the parts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..distributed import rank_shards
from ..errors import ConfigError
from ..tables import RowBuffer, atomic_path, atomic_write_json, write_parquet_atomic
from .batches import Normalizer, Timings, run_stream
from .outdir import PassResult
from .planning import describe, embed_root

CACHE_VERSION = 1


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class EmbedResult(PassResult):
    cache: str
    shards: list
    offsets: dict[int, int]  # shard index → first row in the global matrix
    columns_all: dict[str, np.ndarray]  # per global embedded row
    info: dict[str, Any]

    ROW = "emb_row"
    ROOT = "cache"
    WHAT = "embedding cache"


def _encoder(p, runs_models):
    """The encoder and its fingerprint: the trained/given proxy if this run has one, else --checkpoint/--pretrained."""
    from ..models import ModelSpec, create_model

    cfg = p.cfg
    if runs_models:
        model = runs_models[0]
        fp = {"weights": _state_hash(model), "model": cfg.model}
    else:
        if not (cfg.checkpoint or cfg.pretrained):
            raise ConfigError("embedding metrics need an encoder: give --checkpoint (e.g. a proxy trained by `dataprune score`, "
                              "saved as OUT/_proxy-run0.safetensors) or --pretrained, or train a proxy here with --epochs ≥ 1")
        model = create_model(ModelSpec(cfg.model, 0, cfg.pretrained, cfg.checkpoint))
        fp = {"weights": p.meta.get("checkpoint_sha256") or "pretrained", "model": cfg.model}
    fp.update(image_size=p.image_size, mean=list(p.mean), std=list(p.std), max_pixels=cfg.max_pixels, version=CACHE_VERSION,
              transform=describe(p.preprocess()))  # the eval transform the embeddings were taken through
    return model, fp


def _features(model, x):
    """Pooled features before the classifier (timm: forward_head(pre_logits=True))."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def run_embedding(p, device, emit: Callable[[str, dict], None], runs_models=None, t=None, rank: int = 0,
                  world: int = 1) -> EmbedResult:
    """Embed the shards not yet cached, then compute the global metrics. Under torchrun each rank
    embeds ``shards[rank::world]`` into the shared cache, then the ranks compute the global metrics
    together, each over its own rows (``engine.sharded``); one process is a job of one."""
    import torch


    cfg = p.cfg
    model, enc_fp = _encoder(p, runs_models)
    model.to(device).eval()
    model.to(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    data_fp = {"source": p.source.spec(), "shards": p.meta["shard_fingerprint"]}
    fp = _sha({"encoder": enc_fp, "data": data_fp})
    root = embed_root(cfg)
    cache = os.path.join(root, fp)
    os.makedirs(cache, exist_ok=True)
    atomic_write_json(os.path.join(cache, "info.json"), {"encoder": enc_fp, "data": data_fp})
    todo, damaged = [], []
    for s in rank_shards(p.shards, rank, world):
        state = _cached(cache, s.index)
        if state is not True:
            todo.append(s)
            if state is not None:
                damaged.append(f"embedding cache {cache}: shard {s.index} {state}: embedded again")
    emit("embed", {"shards": len(p.shards), "todo": len(todo), "cache": cache, "todo_index": [s.index for s in todo]})
    norm = Normalizer(p.mean, p.std, device, True)
    t = t or Timings()

    def compute(batch) -> dict[str, np.ndarray]:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            f = _features(model, norm(batch["images"])).float()
        f = torch.nn.functional.normalize(f, dim=1)
        hb, hp = batch["hashes"]
        emit("embed_batch", {"samples": len(batch["rows"])})
        return {"emb": f.cpu().numpy().astype(np.float16), "bh": np.array(hb, np.uint64), "ph": np.array(hp, np.uint64)}

    def finish(sidx, base, rows, vals, shard_error) -> None:
        n = len(base["sample_id"])
        emb = vals.get("emb", np.zeros((0, 0), np.float16))
        finite = np.isfinite(emb).all(1) if emb.size else np.ones(len(rows), bool)
        if not finite.all():  # a NaN/inf embedding would poison k-means and every distance: that row is not scored
            for r in np.asarray(rows)[~finite]:
                base["status"][r] = "nan_score"
                base["error"][r] = f"{base['loc_path'][r]}: sample {base['key'][r]!r}: the encoder's embedding is not finite"
            rows, emb = np.asarray(rows)[finite], emb[finite]
            vals = {k: np.asarray(v)[finite] for k, v in vals.items()}
        with atomic_path(os.path.join(cache, f"emb-{sidx:06d}.npy")) as tmp, open(tmp, "wb") as f:
            np.save(f, emb)
        emb_row = np.full(n, -1, np.int32)
        emb_row[rows] = np.arange(len(rows), dtype=np.int32)
        bh = np.zeros(n, np.uint64)
        ph = np.zeros(n, np.uint64)
        if len(rows):
            bh[rows], ph[rows] = vals["bh"], vals["ph"]
        buf = RowBuffer()
        buf.cols = base
        table = buf.table({"emb_row": pa.array(emb_row), "bytes_hash": pa.array(bh), "pixel_hash": pa.array(ph)})
        write_parquet_atomic(table, os.path.join(cache, f"base-{sidx:06d}.parquet"), {"shard_error": shard_error})
        emit("embed_shard", {"index": sidx, "rows": n, "embedded": len(rows)})

    if todo:
        run_stream(p.stream(cuda=cuda, hashes=True), todo, compute, finish, t)
    res = _job_metrics(p, cache, device, emit, rank, world)
    res.info["notes"] = damaged + res.info.get("notes", [])
    return res


def _cached(cache: str, sidx: int) -> bool | str | None:
    """True when shard ``sidx`` is in the cache and reads back (its base rows, and as many float16
    embedding rows as they say were embedded); None when it is not there; else what is wrong (the
    cache is a directory other runs share: it is checked, not trusted)."""
    base = os.path.join(cache, f"base-{sidx:06d}.parquet")
    if not os.path.exists(base):
        return None
    try:
        n = int((pq.read_table(base, columns=["emb_row"]).column("emb_row").to_numpy() >= 0).sum())
        emb = np.load(os.path.join(cache, f"emb-{sidx:06d}.npy"), mmap_mode="r")
        if emb.dtype == np.float16 and emb.ndim == 2 and emb.shape[0] == n:
            return True
        why = f"holds {emb.shape[0] if emb.ndim else 0} embeddings for {n} rows"
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        why = f"is unreadable ({type(e).__name__})"
    os.unlink(base)  # its presence is the done-marker
    return why


def _job_metrics(p, cache: str, device, emit, rank: int, world: int) -> EmbedResult:
    """The global metrics over this rank's rows, with the job's other ranks (``engine.sharded``).
    Every shard is in the cache before any rank reads one (a barrier)."""
    from .sharded import job_metrics

    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    offsets, columns, info = job_metrics(p, cache, device, emit, rank, world)
    return EmbedResult(cache, p.shards, offsets, columns, info)
