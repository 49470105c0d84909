"""Proxy-model training for the training-dynamics metrics.

Streams shards (seeded shard order per epoch, a shuffle buffer in every DataLoader worker,
random-crop + flip augmentation), trains a timm model with SGD + momentum and a cosine or step
schedule, and records per-sample statistics (correctness and logit margin at every presentation)
in arrays indexed by ``(shard index, row in shard)`` — never Python objects per sample. Each run
checkpoints after every epoch (model, optimiser, statistics) and resumes from there.
"""

from __future__ import annotations

import math
import os
import random
import time
from typing import Callable


from ..distributed import rank_shards
from ..errors import check_stop
from ..metrics.dynamics import DynStats
from ..tables import atomic_path
from .batches import Normalizer, Preprocess, loader, worker_shards
from .planning import CKPT_DIR, ckpt_path, proxy_path  # noqa: F401  (CKPT_DIR: the checkpoints' directory in OUT)


class TrainStream:
    """IterableDataset of single augmented samples ``(image, label, shard, row)`` in shuffled order."""

    def __init__(self, spec: dict, shards: list, pre: Preprocess, buffer: int, seed: int, keep: dict | None = None,
                 num_classes: int = 1 << 30):
        self.spec, self.shards, self.pre, self.buffer, self.seed = spec, shards, pre, buffer, seed
        self.num_classes = num_classes  # labels outside [0, num_classes) are not trained on
        self.keep = keep  # optional {shard index: bool array over rows}: train on those rows only

    def __iter__(self):
        import torch

        from ..decode import DEFAULT_MAX_PIXELS, decode_image
        from ..errors import DecodeError, SourceError
        from ..sources import source_from_spec

        order = list(self.shards)
        random.Random(self.seed).shuffle(order)
        mine, wid, _ = worker_shards(order)
        gen = torch.Generator().manual_seed(self.seed * 1009 + wid)
        pick = random.Random(self.seed * 7919 + wid)
        source = source_from_spec(self.spec)
        buf: list = []
        max_pixels = self.pre.max_pixels or DEFAULT_MAX_PIXELS
        for shard in mine:
            mask = None if self.keep is None else self.keep.get(shard.index)
            if self.keep is not None and (mask is None or not mask.any()):
                continue
            try:
                for row, s in enumerate(source.iter_samples(shard)):
                    if not s.ok or s.label is None or not 0 <= s.label < self.num_classes or (
                            mask is not None and (row >= len(mask) or not mask[row])):
                        continue
                    try:
                        img = self.pre(decode_image(s.image, max_pixels), gen)
                    except DecodeError:
                        continue
                    item = (img, s.label, shard.index, row)
                    if len(buf) < self.buffer:
                        buf.append(item)
                        continue
                    j = pick.randrange(len(buf))
                    buf[j], item = item, buf[j]
                    yield item
            except SourceError:
                continue  # counted by the scoring pass, which reads the same shards
        pick.shuffle(buf)
        yield from buf


def lr_at(epoch: int, epochs: int, base: float, schedule: str) -> float:
    if schedule == "step":
        return base * (0.1 ** sum(epoch >= int(epochs * f) for f in (0.5, 0.75)))
    return base * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))


def _save(path: str, obj: dict) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def train_runs(p, device, emit: Callable[[str, dict], None], rank: int = 0, world: int = 1):
    """Train ``cfg.runs`` proxy models (resuming from per-epoch checkpoints); returns (models at
    --score-epoch, DynStats). Under torchrun (``world`` > 1, process group initialised) the ranks
    train one model together with DistributedDataParallel, each on ``shards[rank::world]`` — the
    shards it scores afterwards, so its per-sample statistics are complete for them."""
    cfg = p.cfg
    stats = DynStats(cfg.runs, cfg.epochs)
    ckdir = os.path.join(cfg.out, CKPT_DIR)
    os.makedirs(ckdir, exist_ok=True)
    models = []
    for run in range(cfg.runs):
        model = train_model(p, device, emit, seed=cfg.seed + 1000 * run, epochs=cfg.epochs, ckpt=ckpt_path(cfg.out, run),
                            run=run, stats=stats, score_epoch=cfg.score_epoch or cfg.epochs, rank=rank, world=world)
        if rank == 0:
            export_proxy(model, proxy_path(cfg.out, run))
        models.append(model)
    return models, stats


def train_model(p, device, emit: Callable[[str, dict], None], *, seed: int, epochs: int, ckpt: str, run: int = 0,
                stats: DynStats | None = None, score_epoch: int | None = None, keep: dict | None = None, rank: int = 0,
                world: int = 1):
    """Train one model from scratch on the plan's data (only the rows ``keep[shard][row]`` when
    given), checkpointing to ``ckpt`` after every epoch and resuming from it. Per-sample correctness
    and margins go to ``stats``. Returns the model at ``score_epoch`` (default: the last), in eval mode."""
    import torch
    import torch.nn.functional as F

    from ..errors import ConfigError
    from ..metrics.outputs import logit_margin
    from ..models import ModelSpec, create_model

    cfg = p.cfg
    cuda = device.type == "cuda"
    norm = Normalizer(p.mean, p.std, device, True)
    pre = Preprocess(p.image_size, True, cfg.max_pixels)
    score_epoch = score_epoch or epochs
    torch.manual_seed(seed)
    model = create_model(ModelSpec(cfg.model, p.num_classes, cfg.pretrained, cfg.checkpoint)).to(device)
    model = model.to(memory_format=torch.channels_last)
    decay = [q for n, q in model.named_parameters() if q.ndim > 1]
    no_decay = [q for n, q in model.named_parameters() if q.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    start, score_state = 0, None
    if os.path.exists(ckpt):
        ck = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        if stats is not None:
            stats.load(ck["stats"])
        start, score_state = int(ck["epoch"]), ck.get("score_model")
        emit("resume", {"run": run, "epoch": start})
    emit("train_start", {"run": run, "epoch": start, "epochs": epochs,
                         "samples": None if keep is None else int(sum(int(m.sum()) for m in keep.values()))})
    ddp = world > 1
    shards = rank_shards(p.shards, rank, world)
    net = model
    if ddp:  # one model trained by every rank; gradients are averaged, uneven batch counts are joined
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    for epoch in range(start, epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at(epoch, epochs, cfg.lr, cfg.schedule)
        model.train()
        stream = TrainStream(p.source.spec(), shards, pre, cfg.shuffle_buffer, seed=seed * 100003 + epoch, keep=keep,
                             num_classes=p.num_classes)
        t0 = time.perf_counter()
        n = correct_total = steps = 0
        loss_total = 0.0
        for images, labels, shard, row in _joined(net, loader(stream, min(cfg.workers, max(1, len(shards))), cfg.batch_size,
                                                              cuda), ddp):
            check_stop()
            if len(labels) < 2:  # batch norm cannot train on one sample (a worker's last, partial batch)
                continue
            x = norm(images)
            y = labels.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                lf = logits.float()
                correct = (lf.argmax(1) == y).cpu().numpy()
                if stats is not None:
                    stats.update(run, shard.numpy(), row.numpy(), correct, logit_margin(lf, y).cpu().numpy())
            n += len(y)
            steps += 1
            correct_total += int(correct.sum())
            loss_total += float(loss.detach()) * len(y)
            emit("train_step", {"run": run, "epoch": epoch, "epochs": epochs, "samples": len(y)})
        n_rank = n  # this rank's own samples (the totals below are over every rank)
        if not ddp:
            stat_state = stats.state() if stats is not None else {}
        else:  # totals over ranks; rank 0 saves one checkpoint holding every rank's statistics
            _sync_state(model, opt, steps, device, world)
            tot = torch.tensor([n, correct_total, loss_total], dtype=torch.float64, device=device)  # NCCL: on the GPU
            dist.all_reduce(tot)
            n, correct_total, loss_total = int(tot[0]), int(tot[1]), float(tot[2])
            mine = stats.state(only={sh.index for sh in shards}) if stats is not None else {}
            parts = [None] * world if rank == 0 else None
            dist.gather_object(mine, parts, dst=0)
            stat_state = {k: v for part in (parts or []) for k, v in part.items()}
        if n == 0:
            raise ConfigError(f"{cfg.data}: no labelled, decodable samples to train on")
        if epoch + 1 == score_epoch:
            score_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if rank == 0:
            _save(ckpt, {"epoch": epoch + 1, "model": model.state_dict(), "opt": opt.state_dict(), "stats": stat_state,
                         "score_model": score_state})
        if ddp:
            dist.barrier()  # no rank runs ahead of the checkpoint it would resume from
        emit("train_epoch", {"run": run, "epoch": epoch + 1, "epochs": epochs, "loss": loss_total / n,
                             "acc": correct_total / n, "samples": n, "rank_samples": n_rank, "seconds": time.perf_counter() - t0})
    if score_state is not None:
        model.load_state_dict(score_state)
    model.eval()
    return model


def _sync_state(model, opt, steps: int, device, world: int) -> None:
    """After an epoch with uneven batch counts, DDP's join copies the weights of a rank that ran every
    step, but not the optimiser's momentum: ranks that ran out early keep stale momentum, train
    apart in the next epoch, and rank 0's checkpoint would resume another run. So every rank takes
    weights, buffers and momentum from the first rank with the most steps."""
    import torch
    import torch.distributed as dist

    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([steps], dtype=torch.long, device=device))
    src = int(torch.cat(counts).argmax())
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src)
        for q in model.parameters():
            state = opt.state[q]
            if state.get("momentum_buffer") is None:  # zeros act as no momentum (SGD without dampening)
                state["momentum_buffer"] = torch.zeros_like(q)
            dist.broadcast(state["momentum_buffer"], src)


def _joined(net, batches, ddp: bool):
    """Iterate ``batches`` inside DDP's join context, so ranks with fewer batches do not hang."""
    if not ddp:
        yield from batches
        return
    with net.join():
        yield from batches


def export_proxy(model, path: str) -> None:
    """The trained proxy (at --score-epoch) as safetensors: reusable with --checkpoint, e.g. as the
    encoder for the prototype metrics when no pretrained weights are available."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
