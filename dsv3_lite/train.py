"""A small, seeded training loop for the chapters' experiments (report 4.2's optimizer settings).

AdamW with beta = (0.9, 0.95), weight decay 0.1, gradient clipping at 1.0, linear warm-up then cosine decay
to 10% of the peak learning rate. Deterministic on a CPU for a fixed seed and thread count.
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
    """Loss curves of one run: train loss at every step, validation loss at each evaluation."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)

    @property
    def final_val_loss(self) -> float:
        if not self.val_loss:
            raise ValueError("no validation loss was recorded (eval_every was 0 and no final evaluation)")
        return self.val_loss[-1][1]


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of `model(x)` (logits of shape (batch, seq, vocab)) against `y`."""
    logits = model(x)
    if logits.shape[:2] != y.shape:
        raise ValueError(f"model(x) must return logits (batch, seq, vocab); got {tuple(logits.shape)} "
                         f"for targets {tuple(y.shape)}")
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU if it has none); batches are drawn on the CPU, so every device
    sees the same windows, and then moved there."""
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


@torch.no_grad()
def evaluate(model: nn.Module, corpus: Corpus, split: str = "val", batch_size: int = 16, seq_len: int = 128,
             n_batches: int = 8, seed: int = 1234) -> float:
    """Mean next-token loss over `n_batches` fixed windows (the same windows for every model and call)."""
    generator = torch.Generator().manual_seed(seed)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(n_batches):
        x, y = corpus.batch(split, batch_size, seq_len, generator)
        losses.append(lm_loss(model, x.to(device), y.to(device)).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to lr / 10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_lm(model: nn.Module, corpus: Corpus, steps: int, batch_size: int = 16, seq_len: int = 128,
             lr: float = 3e-3, weight_decay: float = 0.1, warmup: int | None = None, grad_clip: float = 1.0,
             seed: int = 0, eval_every: int = 0, eval_batches: int = 8, loss_fn: LossFn | None = None,
             on_step: StepHook | None = None, progress: bool | None = None) -> History:
    """Train `model` on `corpus` for `steps` optimizer steps and return its loss history.

    loss_fn(model, x, y) -> scalar loss replaces the plain next-token loss (e.g. to add MTP or balance
    losses); on_step(model, step) runs after every optimizer step (e.g. the auxiliary-loss-free bias update).
    Validation runs every `eval_every` steps (0: only at the end). The progress bar is on unless
    `progress=False` or the environment sets DSV3_LITE_PROGRESS=0 (as the notebook tests do).
    """
    if steps <= 0:
        raise ValueError(f"steps ({steps}) must be > 0")
    if eval_every < 0:
        raise ValueError(f"eval_every ({eval_every}) must be >= 0")
    warmup = max(1, steps // 10) if warmup is None else warmup
    if progress is None:
        progress = os.environ.get("DSV3_LITE_PROGRESS", "1") != "0"
    loss_fn = loss_fn or lm_loss
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
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
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if on_step is not None:
            on_step(model, step)
        history.train_loss.append(loss.item())
        if (eval_every and (step + 1) % eval_every == 0) or step + 1 == steps:
            if not history.val_loss or history.val_loss[-1][0] != step + 1:
                history.val_loss.append((step + 1, evaluate(model, corpus, "val", batch_size, seq_len,
                                                             eval_batches)))
            bar.set_postfix(train=f"{loss.item():.3f}", val=f"{history.val_loss[-1][1]:.3f}")
    bar.close()
    return history
