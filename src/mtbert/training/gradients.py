"""Per-task gradients of the shared parameters, for gradient combiners (PCGrad and successors)."""
from __future__ import annotations

import torch


def per_task_gradients(terms: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """One flattened gradient per loss term, [T, N] (N = total size of `params`); a parameter a
    term does not reach gets zeros. The graph is kept for a later backward."""
    flat = []
    for term in terms:
        g = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        flat.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params)]))
        del g
    return torch.stack(flat)


def set_flat_grad(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a flattened gradient [N] back into the parameters' .grad."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).to(p.dtype)
        offset += n
