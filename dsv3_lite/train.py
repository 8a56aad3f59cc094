"""A small, seeded training loop for the chapters' experiments
(report 4.2's optimizer settings).

AdamW with beta = (0.9, 0.95), weight decay 0.1, gradient clipping at 1.0, linear
warm-up then cosine decay to 10% of the peak learning rate. Deterministic on a CPU
for a fixed seed and thread count.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dsv3_lite.data import Corpus

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
StepHook = Callable[[nn.Module, int], None]


@dataclass
class History:
    """Loss curves of one run: train loss at every step, validation loss
    at each evaluation."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)

    @property
    def final_val_loss(self) -> float:
        if not self.val_loss:
            raise ValueError("no validation loss was recorded "
                             "(eval_every was 0 and no final evaluation)")
        return self.val_loss[-1][1]


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of `model(x)` (logits of shape (batch, seq, vocab))
    against `y`."""
    return _cross_entropy(model(x), y)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
    if logits.shape[:2] != y.shape:
        raise ValueError("model(x) must return logits (batch, seq, vocab); got "
                         f"{tuple(logits.shape)} for targets {tuple(y.shape)}")
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                           reduction=reduction)


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} ({value}) must be >= {minimum}")


def _check_rate(name: str, value: object, positive: bool, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{name} ({value}) must be a finite number "
                         f"{'> 0' if positive else '>= 0'}{why}")


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU if it has none); batches are drawn on
    the CPU, so every device sees the same windows, and then moved there."""
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


@torch.no_grad()
def evaluate(model: nn.Module, corpus: Corpus, split: str = "val",
             batch_size: int = 16, seq_len: int = 128, n_batches: int = 8,
             seed: int = 1234,
             by_domain: bool = False) -> float | tuple[float, dict[str, float]]:
    """Mean next-token loss over `n_batches` fixed windows (the same windows
    for every model and call).

    by_domain=True also returns the mean loss over the target tokens of each of
    `corpus.domains` (NaN for a domain with no token in the windows).
    """
    _check_count("n_batches", n_batches, 1)
    generator = torch.Generator().manual_seed(seed)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    losses = []
    total = torch.zeros(len(corpus.domains), dtype=torch.float64)
    count = torch.zeros_like(total)
    try:
        for _ in range(n_batches):
            # with by_domain, `labels` holds the domain index of every target token
            x, y, *labels = corpus.batch(split, batch_size, seq_len, generator,
                                         domains=by_domain)
            logits, y = model(x.to(device)), y.to(device)
            losses.append(_cross_entropy(logits, y).item())
            if by_domain:
                per_token = _cross_entropy(logits, y, reduction="none").double().cpu()
                total.index_add_(0, labels[0].flatten(), per_token)
                count.index_add_(0, labels[0].flatten(), torch.ones_like(per_token))
    finally:
        model.train(was_training)
    mean = sum(losses) / n_batches
    return ((mean, dict(zip(corpus.domains, (total / count).tolist()))) if by_domain
            else mean)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to lr / 10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_lm(model: nn.Module, corpus: Corpus, steps: int, batch_size: int = 16,
             seq_len: int = 128, lr: float = 3e-3, weight_decay: float = 0.1,
             warmup: int | None = None, grad_clip: float = 1.0, seed: int = 0,
             eval_every: int = 0, eval_batches: int = 8,
             loss_fn: LossFn | None = None, on_step: StepHook | None = None,
             progress: bool | None = None) -> History:
    """Train `model` on `corpus` for `steps` optimizer steps and return
    its loss history.

    loss_fn(model, x, y) -> scalar loss replaces the plain next-token loss
    (e.g. to add MTP or balance losses); on_step(model, step) runs after every
    optimizer step (e.g. the auxiliary-loss-free bias update). Validation runs every
    `eval_every` steps (0: only at the end). grad_clip 0 switches clipping off.
    The progress bar is on unless `progress=False` or the environment sets tqdm's
    own TQDM_DISABLE (as the notebook tests do). A loss that is not finite stops
    training with a `FloatingPointError`.
    """
    for name, value, minimum in (
            ("steps", steps, 1), ("batch_size", batch_size, 1),
            ("seq_len", seq_len, 1), ("eval_every", eval_every, 0),
            ("eval_batches", eval_batches, 1)):
        _check_count(name, value, minimum)
    _check_rate("lr", lr, positive=True)
    _check_rate("weight_decay", weight_decay, positive=False)
    _check_rate("grad_clip", grad_clip, positive=False,
                why=" (0 switches clipping off; a negative one would turn descent "
                    "into ascent)")
    if warmup is None:
        warmup = max(1, steps // 10)
    _check_count("warmup", warmup, 0)
    if warmup > steps:
        raise ValueError(f"warmup ({warmup}) must be <= steps ({steps}), or lr "
                         "is never reached")
    # tqdm's notebook bar ignores TQDM_DISABLE, so it is read here for both bars
    if progress is None:
        progress = not os.environ.get("TQDM_DISABLE")
    loss_fn = loss_fn or lm_loss
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    device = _device_of(model)
    history = History()
    model.train()
    bar = tqdm(range(steps), disable=not progress, desc="training")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        x, y = corpus.batch("train", batch_size, seq_len, generator)
        loss = loss_fn(model, x.to(device), y.to(device))
        value = loss.item()
        if not math.isfinite(value):
            bar.close()
            raise FloatingPointError(
                f"the training loss is {value} at step {step + 1} of {steps} "
                "(the model keeps the weights of the step before): the run diverged "
                "or overflowed. Try FP32 or BF16 instead of FP16, a lower lr "
                f"(now {lr}), or gradient clipping (grad_clip now {grad_clip})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if on_step is not None:
            on_step(model, step)
        history.train_loss.append(value)
        if (eval_every and (step + 1) % eval_every == 0) or step + 1 == steps:
            if not history.val_loss or history.val_loss[-1][0] != step + 1:
                history.val_loss.append((step + 1,
                                         evaluate(model, corpus, "val", batch_size,
                                                  seq_len, eval_batches)))
            bar.set_postfix(train=f"{value:.3f}",
                            val=f"{history.val_loss[-1][1]:.3f}")
    bar.close()
    return history


class TrainingLoss:
    """`loss_fn` for `train_lm` with a `dsv3_lite.model.Transformer`:
    `Transformer.loss` with a fixed MTP weight lambda. It records each step's main
    loss, per-depth MTP losses and expert load, and its `update_bias` is the matching
    `on_step` hook (the auxiliary-loss-free bias update from the step's load):

        loss = TrainingLoss(mtp_lambda=0.3)
        train_lm(model, corpus, steps, loss_fn=loss, on_step=loss.update_bias)
    """

    def __init__(self, mtp_lambda: float = 0.0):
        self.mtp_lambda = mtp_lambda
        self.main: list[float] = []
        self.mtp_depths: list[list[float]] = []
        # per step: (n MoE layers, n_routed_experts)
        self.expert_loads: list[torch.Tensor] = []

    def __call__(self, model: nn.Module, tokens: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
        parts = model.loss(tokens, targets, self.mtp_lambda)
        self.main.append(parts.main.item())
        self.mtp_depths.append([d.item() for d in parts.mtp_depths])
        self.expert_loads.append(parts.expert_load)
        return parts.total

    def update_bias(self, model: nn.Module, step: int | None = None) -> None:
        """`on_step` hook: `model.update_bias` with the load of the
        step just taken."""
        if not self.expert_loads:
            raise RuntimeError("update_bias needs a step's expert load: call "
                               "the loss first")
        model.update_bias(self.expert_loads[-1])
