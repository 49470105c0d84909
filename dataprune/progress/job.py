"""Folds the engine's events into one :class:`~dataprune.progress.work.Work` (see its docstring for
the ETA rule) and a label for the current phase.

Events read here (``emit(kind, info)`` by the engine, the curve and the embedding set):

* ``plan`` — ``work``: ``rows`` (:func:`~dataprune.progress.rows.estimate_rows` of this rank's
  shards), ``mine`` / ``todo`` (their indices; those still to score), ``train`` ({runs, epochs}
  or None), ``embed`` (bool), ``kmeans`` ({iters, sample} or None), ``score_cost``.
* ``train_start`` {run, epoch (first epoch to train), epochs, samples (per epoch, when known)},
  ``train_step`` {run, epoch, epochs, samples}, ``train_epoch`` {…, samples, rank_samples, seconds},
  ``resume``.
* ``embed`` {todo, todo_index}, ``embed_batch`` {samples}, ``embed_shard`` {index, rows},
  ``kmeans_start`` {clusters, rows, fit_rows, iters}, ``kmeans_step`` {stage: fit | assign, done,
  total}, ``kmeans``, ``embed_done``.
* ``score_start`` {shards}, ``score_batch`` {samples}, ``shard`` {index, seen, …}, ``rescore``.
* ``curve_plan`` {runs, units: [{epochs, kept}]}, ``curve_run``.
"""

from __future__ import annotations

from typing import Optional

from .rows import Rows
from .work import EMBED_COST, KMEANS_COST, TRAIN_COST, Work

PHASE, SUB, STEP = "phase", "sub", "step"


class Job:
    def __init__(self) -> None:
        self.work = Work()
        self.rows = Rows()
        self.mode = "score"
        self.units: list[dict] = []  # training runs (score) or curve units: epochs, per_epoch, done, complete
        self.cur = 0
        self.in_epoch = 0.0
        self.todo: dict[str, list] = {"embed": [], "score": []}
        self.shards_done = {"embed": 0, "score": 0}
        self.in_shard = {"embed": 0.0, "score": 0.0}
        self.curve_done = 0
        self.kmeans_iters = 0
        self.mine: list = []
        self.shown: Optional[str] = None  # the phase the last event was about

    # ------------------------------------------------------------------ helpers

    def _unit(self, i: int) -> dict:
        while len(self.units) <= i:
            self.units.append({"epochs": None, "per_epoch": None, "done": 0.0, "complete": False, "exact": False})
        return self.units[i]

    def _train_total(self) -> Optional[float]:
        tot = 0.0
        for u in self.units:
            if u["complete"]:
                tot += u["done"]
            elif u["epochs"] is None or u["per_epoch"] is None:
                return None
            else:
                tot += max(u["done"], u["epochs"] * u["per_epoch"])
        return tot

    def _refresh(self) -> None:
        w = self.work
        if self.units and w.get("train") and not w.phases["train"].finished:
            w.phases["train"].total = self._train_total()
        for name in ("embed", "score"):
            ph = w.get(name)
            if ph is not None and not ph.finished:
                ph.total = self.rows.of(self.todo[name])
                if ph.total is not None:
                    ph.total = max(ph.total, ph.done)
        if self.mode == "score":
            for u in self.units:
                if not u["exact"]:
                    u["per_epoch"] = self.rows.of(self.mine)

    def _shard_label(self, name: str) -> str:
        n = len(self.todo[name])
        return f"{name} shard {min(self.shards_done[name] + 1, n)}/{n}"

    def _train_label(self, epoch: int) -> str:
        u = self._unit(self.cur)
        ep = f"epoch {epoch + 1}/{u['epochs']}"
        if self.mode == "curve":
            return f"curve run {self.cur + 1}/{len(self.units)} train {ep}"
        return f"train run {self.cur + 1}/{len(self.units)} {ep}"

    # ------------------------------------------------------------------ events

    def on(self, kind: str, info: dict, now: float) -> tuple[Optional[str], Optional[str]]:
        """Fold one event in. Returns (``"phase"`` when a phase began or ended, ``"sub"`` at an epoch's or
        shard's end, ``"step"`` for progress inside, None; a message worth a line of its own, or None)."""
        h = getattr(self, "_on_" + kind, None)
        return h(info, now) if h is not None else (None, None)

    def _on_plan(self, info: dict, now: float):
        w, work = info.get("work") or {}, self.work
        self.rows = Rows(w.get("rows"))
        self.mine = list(w.get("mine") or [])
        tr = w.get("train")
        if tr:
            per = self.rows.of(self.mine)
            for r in range(int(tr["runs"])):
                self._unit(r).update(epochs=int(tr["epochs"]), per_epoch=per)
            work.add("train", self._train_total(), TRAIN_COST)
        if w.get("embed"):
            self.todo["embed"] = list(self.mine)
            work.add("embed", self.rows.of(self.mine), EMBED_COST)
        km = w.get("kmeans")
        if km:
            n = self.rows.of(self.mine) or 0.0
            fit = min(n, km["sample"]) if km.get("sample") else n
            self.kmeans_iters = int(km["iters"])
            work.add("global", self.kmeans_iters + 1, max(fit, 1.0) * KMEANS_COST, unit="it")
        self.todo["score"] = list(w.get("todo") if "todo" in w else [])
        work.add("score", self.rows.of(self.todo["score"]) if "todo" in w else None, float(w.get("score_cost", 1.0)))
        if "todo" in w and not self.todo["score"]:
            work.finish("score", now)
        size = f", image size {info['image_size']}" if info.get("image_size") else ""  # text metrics read no pixels
        msg = (f"score: {info['todo']} shard(s) to score ({info['done']} already done) on {info['device']}{size}, "
               f"metrics {', '.join(info['metrics'])}")
        parts = []
        if tr:
            per = self.rows.of(self.mine)
            parts.append(f"train {tr['runs']} run(s) × {tr['epochs']} epochs × {'?' if per is None else int(per)} samples")
        if w.get("embed"):
            parts.append("embed" + (" + k-means" if km else ""))
        tot = work.phases["score"].total
        parts.append(f"score {'?' if tot is None else int(tot)} samples")
        return None, msg + " · work: " + ", ".join(parts)

    def _on_curve_plan(self, info: dict, now: float):
        self.mode = "curve"
        for i, u in enumerate(info.get("units") or []):
            self._unit(i).update(epochs=int(u["epochs"]), per_epoch=float(u["kept"]))
        if self.units:
            self.work.add("train", self._train_total(), TRAIN_COST)
        else:
            self.work.finish("train", now)
        return None, f"curve: {info['runs']} training run(s) by {info.get('metric')} over {info.get('candidates')} candidates"

    def _on_train_start(self, info: dict, now: float):
        self.cur = self.curve_done if self.mode == "curve" else int(info.get("run", 0))
        u = self._unit(self.cur)
        u["epochs"] = int(info["epochs"])
        if info.get("samples") is not None:
            u["per_epoch"], u["exact"] = float(info["samples"]), True
        if self.work.get("train") is None:
            self.work.add("train", None, TRAIN_COST)
        start, self.in_epoch = int(info.get("epoch", 0)), 0.0
        if start and u["per_epoch"] is not None:
            self.work.skip("train", start * u["per_epoch"])
            u["done"] += start * u["per_epoch"]
        u["pending_skip"] = start if u["per_epoch"] is None else 0
        changed = self.work.enter("train", now)
        self.shown = "train"
        self.work.phases["train"].label = self._train_label(min(start, u["epochs"] - 1) if u["epochs"] else 0)
        if start >= u["epochs"]:
            u["complete"] = True
            self._train_done(now)
        self._refresh()
        return (PHASE if changed else None), None

    def _train_done(self, now: float) -> None:
        if all(u["complete"] for u in self.units):
            self.work.finish("train", now)
            self.work.phases["train"].label = "train done"

    def _on_train_step(self, info: dict, now: float):
        n = float(info["samples"])
        changed = self.work.enter("train", now)
        self.work.advance("train", n, now)
        self._unit(self.cur)["done"] += n
        self.in_epoch += n
        self.work.phases["train"].label = self._train_label(int(info["epoch"]))
        self.shown = "train"
        return (PHASE if changed else STEP), None

    def _on_train_epoch(self, info: dict, now: float):
        u = self._unit(self.cur)
        n = float(info.get("rank_samples", info["samples"]))
        fix = n - self.in_epoch  # batches of one are not trained on, and so on: the epoch's own count wins
        if fix:
            self.work.advance("train", fix, now)
            u["done"] += fix
        self.in_epoch = 0.0
        u["per_epoch"], u["exact"] = n, True
        if u.get("pending_skip"):
            self.work.skip("train", u["pending_skip"] * n)
            u["done"] += u["pending_skip"] * n
            u["pending_skip"] = 0
        if self.mode == "score":
            for v in self.units[self.cur + 1:]:
                v["per_epoch"], v["exact"] = n, True  # the same data every run
        done_run = int(info["epoch"]) >= int(info["epochs"])
        if done_run:
            u["complete"] = True
        self._refresh()
        if done_run and self.mode == "score":
            self._train_done(now)
        secs = float(info.get("seconds", 0.0))
        msg = (f"{self._train_label(int(info['epoch']) - 1)} done: loss {info['loss']:.3f} acc {info['acc']:.3f} · "
               f"{int(info['samples'])} samples in {secs:.1f}s ({info['samples'] / max(secs, 1e-9):.0f} samples/s)")
        self.shown = "train"
        return SUB, msg

    def _on_resume(self, info: dict, now: float):
        return None, f"train run {int(info['run']) + 1}: resuming after epoch {info['epoch']}"

    def _on_curve_run(self, info: dict, now: float):
        u = self._unit(self.curve_done)
        u["complete"] = True
        self.curve_done += 1
        self._refresh()
        if self.curve_done >= len(self.units):
            self.work.finish("train", now)
            self.work.phases["train"].label = "curve runs done"
        msg = (f"curve: keep {info['strategy']} {info['fraction']:g} (repeat {info['repeat']}): {info['kept']} rows, "
               f"{info['epochs']} epochs → test error {100 * info['test_error']:.2f}%")
        return SUB, msg

    def _on_embed(self, info: dict, now: float):
        self.todo["embed"] = list(info.get("todo_index", self.todo["embed"]))
        if self.work.get("embed") is None:
            self.work.add("embed", None, EMBED_COST)
        self.shards_done["embed"], self.in_shard["embed"] = 0, 0.0
        self._refresh()
        changed = self.work.enter("embed", now)
        self.work.phases["embed"].label = self._shard_label("embed")
        self.shown = "embed"
        if not self.todo["embed"]:
            self.work.finish("embed", now)
            self.work.phases["embed"].label = "embed: every shard cached"
        return (PHASE if changed else None), None

    def _on_embed_batch(self, info: dict, now: float):
        return self._batch("embed", info, now)

    def _on_score_batch(self, info: dict, now: float):
        return self._batch("score", info, now)

    def _batch(self, name: str, info: dict, now: float):
        if self.work.get(name) is None:
            self.work.add(name, None, 1.0)
        changed = self.work.enter(name, now)
        n = float(info["samples"])
        self.work.advance(name, n, now)
        self.in_shard[name] += n
        self.work.phases[name].label = self._shard_label(name)
        self.shown = name
        return (PHASE if changed else STEP), None

    def _shard_end(self, name: str, index: int, rows: float, now: float):
        if self.work.get(name) is None:
            self.work.add(name, None, 1.0)
        changed = self.work.enter(name, now)
        self.work.advance(name, rows - self.in_shard[name], now)
        self.in_shard[name] = 0.0
        self.rows.observe(index, rows)
        self.shards_done[name] += 1
        self._refresh()
        ph = self.work.phases[name]
        ph.label = self._shard_label(name)
        self.shown = name
        if self.shards_done[name] >= len(self.todo[name]):
            self.work.finish(name, now)
            ph.label = f"{name}: {self.shards_done[name]} shard(s) done"
            return PHASE, None
        return (PHASE if changed else SUB), None

    def _on_embed_shard(self, info: dict, now: float):
        return self._shard_end("embed", int(info["index"]), float(info["rows"]), now)

    def _on_shard(self, info: dict, now: float):
        return self._shard_end("score", int(info["index"]), float(info["seen"]), now)

    def _on_score_start(self, info: dict, now: float):
        if self.work.get("score") is None:
            self.work.add("score", None, 1.0)
        if self.work.phases["score"].finished:
            return None, None
        changed = self.work.enter("score", now)
        self.work.phases["score"].label = self._shard_label("score")
        self.shown = "score"
        return (PHASE if changed else None), None

    def _on_kmeans_start(self, info: dict, now: float):
        self.kmeans_iters = int(info["iters"])
        g = self.work.add("global", self.kmeans_iters + 1, max(float(info.get("fit_rows", 1)), 1.0) * KMEANS_COST, unit="it")
        changed = self.work.enter("global", now)
        g.label = f"k-means iteration 0/{self.kmeans_iters}"
        self.shown = "global"
        return (PHASE if changed else None), None

    def _on_kmeans_step(self, info: dict, now: float):
        g = self.work.get("global") or self.work.add("global", None, KMEANS_COST, unit="it")
        done, total = float(info["done"]), max(float(info["total"]), 1.0)
        if info.get("stage") == "assign":
            target, g.label = self.kmeans_iters + done / total, f"k-means assignment {int(100 * done / total)}%"
        else:
            target, g.label = done, f"k-means iteration {int(done)}/{self.kmeans_iters}"
        self.work.advance("global", max(0.0, target - g.done), now)
        self.shown = "global"
        return STEP, None

    def _on_kmeans(self, info: dict, now: float):
        g = self.work.get("global")
        if g is not None:
            g.label = f"global steps ({info.get('clusters')} clusters fitted)"
        return None, None

    def _on_embed_done(self, info: dict, now: float):
        if self.work.get("global") is None:
            self.work.add("global", 0.0, 0.0, unit="it")
        g = self.work.phases["global"]
        self.work.advance("global", max(0.0, (g.total or 0.0) - g.done), now)
        self.work.finish("global", now)
        g.label = f"global steps done in {float(info.get('seconds', g.seconds)):.1f}s"
        self.shown = "global"
        return PHASE, None

    def _on_rescore(self, info: dict, now: float):
        return None, f"shard {info['index']}: {info['reason']}: scored again"
