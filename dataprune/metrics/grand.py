"""GraNd (Paul et al. 2021), kind ``init``: the per-example gradient norm of the loss of a model at
initialisation — fresh (or ``--pretrained``) weights, seeded per run, never ``--checkpoint``."""

from __future__ import annotations

from .base import INF, Metric, register


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


def grand(model, x, labels, cfg):
    return grand_scores(model, x, labels, cfg.grand_params)


register(Metric("grand", "init", True, False, 0.0, INF,
                "per-example gradient norm of the loss at initialisation (fresh or --pretrained weights, seeded per run; "
                "never --checkpoint), mean over runs (Paul et al. 2021)", compute=grand))
