"""What a score run will do and did: the progress display's totals (``work``), the per-phase counts of
the result (``Tally``) and the split-half reliability of ``--runs`` ≥ 2 (``reliability``)."""

from __future__ import annotations

import numpy as np

from ..progress.rows import estimate_rows
from ..progress.work import CACHED_SCORE_COST
from ..ranks import spearman
from ..scoretable import marker_indices, read_marker
from ..errors import TableError


def work(p, mine: list, todo: list) -> dict:
    """What this rank's job will do, for the progress display's totals (``dataprune.progress.job``)."""
    cfg, kinds = p.cfg, {m.kind for m in p.metrics}
    trains = cfg.epochs > 0 and bool(kinds & {"train", "eval", "embed"}) and bool(todo)  # a complete table trains nothing
    passes = (cfg.runs if trains else 1) * ("eval" in kinds) + cfg.runs * ("init" in kinds)  # forwards per scored sample
    cached = bool(kinds & {"embed", "text"}) and not trains and not kinds & {"eval", "init"}  # parts written from a cache
    return {"rows": estimate_rows(mine), "mine": [s.index for s in mine], "todo": [s.index for s in todo],
            "train": {"runs": cfg.runs, "epochs": cfg.epochs} if trains else None, "embed": "embed" in kinds and bool(todo),
            "kmeans": {"iters": cfg.kmeans_iters, "sample": cfg.kmeans_sample} if "embed" in kinds and todo else None,
            "score_cost": CACHED_SCORE_COST if cached else float(max(1, passes))}


class Tally:
    """Passes the events on and keeps what the phases did, for the result's per-phase counts."""

    def __init__(self, emit):
        self.emit, self.epochs, self.trained, self.per_epoch, self.embedded = emit, 0, 0, None, 0

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "train_epoch":
            self.epochs, self.trained, self.per_epoch = self.epochs + 1, self.trained + int(info["samples"]), int(info["samples"])
        elif kind == "embed_shard":
            self.embedded += int(info["rows"])
        self.emit(kind, info)

    def result(self, cfg, scored: int, secs: dict, trained: bool) -> dict:
        """``samples``: rows the scoring pass read this run; ``phase_seconds``/``phase_samples``: per phase
        (train, embed, global, score) its wall seconds and the samples it processed this run; ``train``."""
        return {"samples": scored, "phase_seconds": {k: round(v, 3) for k, v in secs.items()},
                "phase_samples": {"train": self.trained, "embed": self.embedded, "score": scored},
                "train": {"runs": cfg.runs, "epochs": cfg.epochs, "epochs_trained": self.epochs, "samples": self.trained,
                          "samples_per_epoch": self.per_epoch, "seconds": round(secs["train"], 3)} if trained else None}


def reliability(out: str, names) -> dict[str, float]:
    """Spearman correlation between the means of two halves of the runs, per metric."""
    rel, stats = {}, []
    for i in marker_indices(out):
        try:
            stats.append(read_marker(out, i))
        except TableError:
            continue
    for k in names:
        try:  # the per-run values of every finished part (markers are files: a malformed one counts for nothing)
            m = np.concatenate([np.asarray(s["runs"][k], dtype=np.float64).reshape(-1, len(s["runs"][k][0])) for s in stats
                                if isinstance(s.get("runs"), dict) and s["runs"].get(k)])
        except (ValueError, TypeError, IndexError):
            continue
        m = m[np.isfinite(m).all(1)]
        if m.shape[0] < 3 or m.shape[1] < 2:
            continue
        a, b = m[:, 0::2].mean(1), m[:, 1::2].mean(1)
        rel[k] = round(spearman(a, b), 4)
    return rel
