"""Metrics of a trained (or given) model's outputs on each sample (kind ``eval``): el2n (Paul et al.
2021), loss, margin, entropy. Each computes one float per sample from a batch of float32 logits,
**higher = harder**."""

from __future__ import annotations

import math

from .base import INF, Metric, register


def logit_margin(logits, labels):
    """assigned logit − largest other logit (positive = correctly classified with room)."""
    import torch

    assigned = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], -torch.inf).amax(1)
    return assigned - other


def el2n(logits, labels):
    import torch.nn.functional as F

    p = logits.softmax(1)
    return (p - F.one_hot(labels, logits.shape[1]).float()).norm(dim=1)


def loss(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits, labels, reduction="none")


def margin(logits, labels):
    return -logit_margin(logits, labels)


def entropy(logits, labels):
    logp = logits.log_softmax(1)
    return (-(logp.exp() * logp).sum(1)).clamp_min(0)


register(Metric("el2n", "eval", True, False, 0.0, math.sqrt(2),
                "||softmax(f(x)) - onehot(y)||_2 of the proxy model at --score-epoch, mean over runs (Paul et al. 2021)",
                compute=el2n))
register(Metric("loss", "eval", True, False, 0.0, INF, "cross-entropy of the proxy or given model", compute=loss))
register(Metric("margin", "eval", True, False, -INF, INF, "minus the logit margin: largest other logit - assigned logit",
                compute=margin))
register(Metric("entropy", "eval", False, False, 0.0, INF, "entropy of the softmax (no labels needed)", compute=entropy))


def eval_metrics(logits, labels, metrics):
    """Per-sample values of the ``eval`` metrics (``Metric`` objects) from one batch of logits."""
    logits = logits.float()
    return {m.name: m.compute(logits, labels).detach() for m in metrics}
