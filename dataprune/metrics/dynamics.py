"""Training-dynamics and model-output metrics (Paul et al. 2021; Toneva et al. 2019; Pleiss et al. 2020).

All functions take a batch and return one float per sample, **higher = harder**.
"""

from __future__ import annotations

import math

from .base import INF, Metric, register

register(Metric("el2n", "eval", True, False, 0.0, math.sqrt(2),
                "||softmax(f(x)) - onehot(y)||_2 of the proxy model at --score-epoch, mean over runs (Paul et al. 2021)"))
register(Metric("grand", "init", True, False, 0.0, INF,
                "per-example gradient norm of the loss at initialisation (fresh or --pretrained weights, seeded per run; "
                "never --checkpoint), mean over runs (Paul et al. 2021)"))
register(Metric("forgetting", "train", True, True, 0.0, INF,
                "learned→forgotten transitions across epochs; never learned = epochs + 1 (Toneva et al. 2019)"))
register(Metric("aum", "train", True, True, -INF, INF,
                "minus the area under the margin: -(mean over epochs of assigned logit - largest other logit) (Pleiss et al. 2020)"))
register(Metric("loss", "eval", True, False, 0.0, INF, "cross-entropy of the proxy or given model"))
register(Metric("margin", "eval", True, False, -INF, INF, "minus the logit margin: largest other logit - assigned logit"))
register(Metric("entropy", "eval", False, False, 0.0, INF, "entropy of the softmax (no labels needed)"))


def logit_margin(logits, labels):
    """assigned logit − largest other logit (positive = correctly classified with room)."""
    import torch

    assigned = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], -torch.inf).amax(1)
    return assigned - other


def eval_metrics(logits, labels, names):
    """Per-sample values of the 'eval' metrics in ``names`` from one batch of logits (float32)."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    out = {}
    if "el2n" in names:
        p = logits.softmax(1)
        out["el2n"] = (p - F.one_hot(labels, logits.shape[1]).float()).norm(dim=1)
    if "loss" in names:
        out["loss"] = F.cross_entropy(logits, labels, reduction="none")
    if "margin" in names:
        out["margin"] = -logit_margin(logits, labels)
    if "entropy" in names:
        logp = logits.log_softmax(1)
        out["entropy"] = (-(logp.exp() * logp).sum(1)).clamp_min(0)
    return {k: v.detach() for k, v in out.items()}


def _split_head(model):
    """(feature extractor output, classifier Linear) for timm models."""
    head = model.get_classifier()
    import torch

    if not isinstance(head, torch.nn.Linear):
        raise TypeError("grand --grand-params head needs a model whose classifier is one Linear layer")
    return head


def grand_scores(model, x, labels, params: str = "all"):
    """Per-example gradient norms ||d loss(x_i, y_i) / d theta||_2 with the model in eval mode.

    ``params="all"``: every parameter, with torch.func (vmap over per-sample grads).
    ``params="head"``: the final Linear layer only, in closed form: ||p - y|| * sqrt(||h||^2 + 1).
    """
    import torch
    import torch.nn.functional as F

    model.eval()
    if params == "head":
        head = _split_head(model)
        with torch.no_grad():
            h = model.forward_head(model.forward_features(x), pre_logits=True).float()
            logits = head(h.to(head.weight.dtype)).float()
            err = logits.softmax(1) - F.one_hot(labels, logits.shape[1]).float()
            norm_h = (h.pow(2).sum(1) + (1.0 if head.bias is not None else 0.0)).sqrt()
            return err.norm(dim=1) * norm_h
    from torch.func import functional_call, grad, vmap

    named = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi[None],))
        return F.cross_entropy(out.float(), yi[None])

    g = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=8)(named, x, labels)  # bounded memory: 8 samples' grads
    sq = None
    for v in g.values():
        s = v.float().pow(2).flatten(1).sum(1)
        sq = s if sq is None else sq + s
    return sq.sqrt()
