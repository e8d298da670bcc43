"""Training diagnostics: how much each weighted loss term pulls on shared parameters.

The fusion layer (``proj_clip``, ``proj_scene``, ``gate``) feeds every head, so the gradient norm of each
weighted term there shows which objective steers the shared embedding; with global-norm clipping a dominant term
also shrinks every other term's step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


def term_gradient_norms(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                        params: Iterable[nn.Parameter], scale: float = 1.0) -> dict[str, float]:
    """For each term k, the L2 norm of d(weight_k · term_k)/d(params) over all ``params`` together.

    The graph is kept (``retain_graph``) so the training backward can follow. A term without weight, or not
    connected to ``params``, gets 0. ``scale`` multiplies each term before differentiation and divides the norm
    after (a loss scale, so fp16 gradients do not underflow); the result is in true units.
    """
    params = [p for p in params if p.requires_grad]
    norms: dict[str, float] = {}
    on_device: dict[str, torch.Tensor] = {}
    for name, term in terms.items():
        w = float(weights.get(name, 0.0))
        norms[name] = 0.0
        if not w or not params or not term.requires_grad:
            continue
        grads = torch.autograd.grad(term * (w * scale), params, retain_graph=True, allow_unused=True)
        sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        if sq:
            on_device[name] = torch.stack(sq).sum().sqrt()
    if on_device:  # one host read for every term (the GPU is not made to wait once per term)
        norms.update({k: v / scale for k, v in zip(on_device, torch.stack(list(on_device.values())).tolist())})
    return norms


def gradient_share_metrics(norms: Mapping[str, float]) -> dict[str, float]:
    """``grad_norm_<term>`` and ``grad_share_<term>`` (norm / sum of norms; 0 when every norm is 0)."""
    total = sum(norms.values())
    out: dict[str, float] = {}
    for name, n in norms.items():
        out[f"grad_norm_{name}"] = n
        out[f"grad_share_{name}"] = n / total if total > 0 else 0.0
    return out


def fusion_parameters(heads: nn.Module) -> list[nn.Parameter]:
    """The shared fusion layer of ``GeopakHeads``: both projections and the gate."""
    return [p for name in ("proj_clip", "proj_scene", "gate") for p in getattr(heads, name).parameters()]
