"""SMART smoothness-inducing adversarial regularisation (Jiang et al., 2020) [papers 001, 004].

Start from small Gaussian noise on the word embeddings, take `steps` projected gradient-ascent
steps of size η on the divergence between clean and perturbed outputs, keeping the perturbation
inside the ε-ball of the chosen norm, then add λ · divergence(f(x + δ), f(x)) to the task loss:
symmetric KL for classification, squared error for regression. Paper 004 turns dropout off for
the perturbed passes (`dropout_off`).
"""
from __future__ import annotations

import contextlib

import torch

from mtbert.core.errors import ConfigError
from mtbert.training.techniques.base import TECHNIQUES, Technique


def project_to_ball(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project each example's perturbation (first dim) onto {||δ||_p ≤ ε}."""
    if norm == "inf":
        return delta.clamp(-eps, eps)
    flat = delta.reshape(delta.shape[0], -1)
    scale = (eps / flat.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale.view(-1, *[1] * (delta.dim() - 1))


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest ascent direction of unit p-norm: sign(g) for ∞, g / ||g||₂ for 2 (per example)."""
    if norm == "inf":
        return grad.sign()
    flat = grad.reshape(grad.shape[0], -1)
    return grad / flat.norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))


@contextlib.contextmanager
def dropout_disabled(model, disable: bool):
    was = model.training
    if disable:
        model.eval()
    try:
        yield
    finally:
        model.train(was)


@TECHNIQUES.register
class Smart(Technique):
    name = "smart"
    summary = "adversarial smoothness regulariser on perturbed input embeddings (SMART)"
    paper = "001, 004; Jiang et al. 2020"

    def __init__(self, weight: float = 1.0, epsilon: float = 1e-5, step_size: float = 1e-3, steps: int = 1,
                 noise_std: float = 1e-5, norm: str = "inf", dropout_off: bool = True, tasks: list | None = None):
        if norm not in ("inf", "2"):
            raise ConfigError("smart.norm must be 'inf' or '2'")
        self.weight, self.epsilon, self.step_size, self.steps = weight, epsilon, step_size, steps
        self.noise_std, self.norm, self.dropout_off, self.tasks = noise_std, str(norm), dropout_off, tasks

    def perturbation(self, forward, embeds: list[torch.Tensor], clean: torch.Tensor, divergence,
                     loss_scale: float = 1.0) -> list[torch.Tensor]:
        """Adversarial δ for each embedded input sequence, inside the ε-ball. Only the gradient's
        direction is used, so under fp16 the divergence is scaled (like the loss) to keep the tiny
        gradients of a 1e-5 perturbation from underflowing."""
        deltas = [project_to_ball(torch.randn_like(e) * self.noise_std, self.epsilon, self.norm) for e in embeds]
        for _ in range(self.steps):
            deltas = [d.detach().requires_grad_(True) for d in deltas]
            div = divergence(forward([e + d for e, d in zip(embeds, deltas)]), clean.detach())
            grads = torch.autograd.grad(div * loss_scale, deltas)
            deltas = [project_to_ball(d + self.step_size * ascent_direction(g, self.norm), self.epsilon, self.norm)
                      for d, g in zip(deltas, grads)]
        return [d.detach() for d in deltas]

    def task_loss(self, ctx, task, batch, logits, loss):
        if self.weight == 0 or (self.tasks and task not in self.tasks):
            return loss
        model, divergence = ctx.model, ctx.kind(task).divergence
        embeds = [model.encoder.embeddings.word(x["input_ids"]) for x in batch["inputs"]]

        def forward(e):
            with ctx.autocast():
                return model(task, batch["inputs"], inputs_embeds=e)
        with dropout_disabled(model, self.dropout_off):
            deltas = self.perturbation(forward, [e.detach() for e in embeds], logits, divergence, ctx.loss_scale)
            adv = forward([e + d for e, d in zip(embeds, deltas)])
        return loss + self.weight * divergence(adv, logits)
