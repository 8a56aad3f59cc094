"""DeepSeek-V3's pre-training recipe (report 4.2) at toy scale: `TrainArgs`
and `Trainer`.

One optimizer step:

    batch     the step's packed sequences (`Corpus.packed`) in a seeded order; the
              batch grows over the first part of the run (batch-size warm-up)
    forward   `Transformer.loss`: next-token loss + lambda x MTP loss + balance
              loss, in FP32, under BF16 autocast, or with FP8 linears
    backward  gradients averaged over the processes (DDP under torchrun)
    clip      the global gradient norm clipped at 1.0
    AdamW     beta = (0.9, 0.95), weight decay 0.1 on matrices only; the learning
              rate warms up, stays constant, decays along a cosine, then holds
              two final constants
    balance   each MoE layer's bias b -= gamma x sign(load - mean load), from the
              step's expert load summed over all processes (so every process
              moves its biases alike); gamma drops to 0 for the last part

Every schedule is a method of `TrainArgs`, a function of the step and of the run's
length `steps`. The report gives its breakpoints in tokens of a 14.8T-token run; here
they are fractions of the run's steps (10T of 14.8T tokens: 0.676), and
`TrainArgs.in_tokens` places them by tokens instead, at the first step by which the
run has trained on that many. A run extended to more steps (`replace(steps=...)` on
resuming) follows from then on the schedules of a run of the new length. The run is
deterministic on a CPU for a seed and thread count, and `Trainer.state_dict` holds
all that a resumed run needs to continue bit for bit. `evaluate` and `History` also
serve the chapters' `train.train_lm`.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from dsv3_lite.config import check_int, check_number
from dsv3_lite.data import Corpus
from dsv3_lite.model import LossParts, Transformer
from dsv3_lite.moe import max_violation

Precision = Literal["fp32", "bf16", "fp8"]


# ----------------------------------------------------------------- shared helpers
def _check_rate(name: str, value: object, positive: bool, why: str = "") -> None:
    check_number(name, value)
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{name} ({value}) must be a finite number "
                         f"{'> 0' if positive else '>= 0'}{why}")


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU if it has none); batches are drawn on
    the CPU, so every device sees the same windows, and then moved there."""
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
    if logits.shape[:2] != y.shape:
        raise ValueError("model(x) must return logits (batch, seq, vocab); got "
                         f"{tuple(logits.shape)} for targets {tuple(y.shape)}")
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                           reduction=reduction)


@torch.no_grad()
def not_finite(model: nn.Module, what: str, step: int, steps: int,
               advice: str) -> FloatingPointError:
    """The error that stops training when a step's loss or gradient is not finite
    (the step is not applied). A weight that already holds NaN or infinity is named:
    the model was built, loaded or changed so before training (each step is checked,
    so no step made it), and no learning rate helps. Otherwise the run diverged."""
    where = f"{what} at step {step + 1} of {steps} (the step is not applied)"
    for name, weight in model.named_parameters():
        if not torch.isfinite(weight).all():
            return FloatingPointError(
                f"{where}: the weight {name} already holds NaN or infinite values, "
                "so the model was built, loaded or changed that way before this "
                "step (training checks every step); the learning rate is not the "
                "cause. Load or build the model again")
    return FloatingPointError(f"{where}: the run diverged or overflowed. Try "
                              f"{advice}")


def evaluate(model: nn.Module, corpus: Corpus, split: str = "val",
             batch_size: int = 16, seq_len: int = 128, n_batches: int = 8,
             seed: int = 1234,
             by_domain: bool = False) -> float | tuple[float, dict[str, float]]:
    """Mean next-token loss over `n_batches` fixed windows (the same windows
    for every model and call).

    by_domain=True also returns the mean loss over the target tokens of each of
    `corpus.domains` (NaN for a domain with no token in the windows).
    """
    check_int("n_batches", n_batches, 1)
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


# -------------------------------------------------------------------------- history
@dataclass
class History:
    """The curves of one run. Lists hold one value per step, except `val_loss`,
    (step, loss) at each evaluation, and `val_by_domain`, (step, {domain: loss}).

    `train.train_lm` records `train_loss` and `val_loss`; `Trainer` all of them:
    `train_loss` is the objective minimised (main + MTP + balance loss), `main_loss`
    the main model's next-token loss alone, `mtp_loss` lambda x L_MTP, `grad_norm`
    the norm before clipping, `max_violation` the mean over MoE layers of the
    step's MaxVio (max load / mean load - 1).
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    main_loss: list[float] = field(default_factory=list)
    mtp_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    max_violation: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    val_by_domain: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    @property
    def final_val_loss(self) -> float:
        if not self.val_loss:
            raise ValueError("no validation loss was recorded "
                             "(eval_every was 0 and no final evaluation)")
        return self.val_loss[-1][1]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "History":
        """Inverse of `dataclasses.asdict` (and of JSON, which turns the
        (step, value) pairs into lists)."""
        data = dict(data)
        for name in ("val_loss", "val_by_domain"):
            data[name] = [tuple(pair) for pair in data.get(name, [])]
        return cls(**data)

    def plot(self, fig: Any) -> Any:
        """Draw the run into `fig`, a matplotlib Figure (this module does not import
        matplotlib), and return it: loss, learning rate, batch size, MaxVio,
        gradient norm and tokens/s against the step, one panel each."""
        panels = [
            ("loss (nats/token)", {"train, main": self.main_loss or self.train_loss,
                                   "train, MTP (x lambda)": self.mtp_loss}),
            ("learning rate", {"": self.lr}),
            ("batch size (sequences)", {"": self.batch_size}),
            ("MaxVio (max / mean load - 1)", {"": self.max_violation}),
            ("gradient norm (before clipping)", {"": self.grad_norm}),
            ("throughput (tokens/s)", {"": self.tokens_per_s}),
        ]
        axes = fig.subplots(2, 3).flatten()
        for ax, (title, curves) in zip(axes, panels):
            for label, values in curves.items():
                if values:
                    ax.plot(range(1, len(values) + 1), values, label=label or None,
                            linewidth=1)
            ax.set_title(title)
            ax.set_xlabel("step")
        if self.val_loss:
            steps, values = zip(*self.val_loss)
            axes[0].plot(steps, values, "o--", markersize=4, label="validation")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        return fig


# ---------------------------------------------------------------------- the recipe
@dataclass(frozen=True)
class TrainArgs:
    """Hyper-parameters of a pre-training run, with the report's values (4.2) where
    they carry over to a toy run (frozen: change a field with `replace`, which
    validates). Fractions are of the run's `steps`; the report's are of its 14.8T
    tokens (`in_tokens` sets them from token counts or fractions of the run's
    tokens). Each schedule is a function of step / steps: a run extended to more
    steps continues on the schedules of a run of its new length.

    Run
        steps: optimizer steps of the whole run (the schedules' horizon).
        seq_len: tokens per training sequence (report: 4K).
        seed: data order and fill-in-the-middle choices.
    Batch size (report: 3,072 -> 15,360 sequences over the first 469B tokens)
        batch_size: sequences per step once warmed up, over all processes.
        batch_size_start: the first steps' batch. It grows in whole multiples of
            itself (the report says only "gradually"), so every level splits evenly
            over any number of processes that divides it.
        batch_warmup: fraction of the run over which it grows (469B / 14.8T: 0.032).
    Learning rate (report: 2.2e-4 -> 2.2e-5 -> 7.3e-6)
        lr: peak learning rate.
        warmup_steps: steps of the linear warm-up from 0 (report: 2K steps; a
            shorter run warms up over all its steps).
        decay_start, decay_end: the cosine decay from lr to lr_decayed x lr runs
            between these fractions (10T and 14.3T of 14.8T: 0.676, 0.966).
        lr_decayed: held from decay_end (2.2e-5 / 2.2e-4: 0.1) ...
        final_start: ... until this fraction (14.633T of 14.8T: 0.989), then
        lr_final: for the rest of the run (7.3e-6 / 2.2e-4: 0.033).
    Optimizer
        beta1, beta2: AdamW's (0.9, 0.95).
        weight_decay: 0.1, on weight matrices only (not on norms or biases).
        grad_clip: maximum global gradient norm (1.0; 0 switches clipping off).
    MTP (report 2.2)
        mtp_lambda: the MTP loss weight (0.3, for the first 10T tokens), ...
        mtp_lambda_late: ... then this (0.1) from
        mtp_switch: this fraction of the run on (10T of 14.8T: 0.676).
    Load balancing (report 2.1.2)
        gamma_off: from this fraction on the bias update speed is 0 (report: 0.001
            for the first 14.3T tokens, 0 for the last 500B: 0.966); before it, the
            model's `ModelArgs.bias_update_speed`.
    Data (report 4.1)
        fim_rate: share of code documents in the fill-in-the-middle layout (0.1);
            the corpus is built with it, `Corpus(..., fim_rate=, seed=)`.
    Precision (report 3.3)
        precision: "fp32"; "bf16" (torch.autocast: matmuls in BF16, parameters,
            gradients and optimizer in FP32); "fp8" (BF16 autocast plus the FP8
            linears of `ModelArgs.fp8`, which the model must have switched on).
    Evaluation
        eval_every: steps between validation losses (0: only at the end).
        eval_batches: fixed validation windows of batch_size x seq_len tokens.
    """

    steps: int = 2000
    seq_len: int = 128
    seed: int = 0
    # batch size
    batch_size: int = 32
    batch_size_start: int = 8
    batch_warmup: float = 0.032
    # learning rate
    lr: float = 3e-3
    warmup_steps: int = 50
    decay_start: float = 0.676
    decay_end: float = 0.966
    lr_decayed: float = 0.1
    final_start: float = 0.989
    lr_final: float = 0.033
    # optimizer
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # MTP
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_switch: float = 0.676
    # load balancing
    gamma_off: float = 0.966
    # data
    fim_rate: float = 0.1
    # precision, evaluation
    precision: Precision = "fp32"
    eval_every: int = 0
    eval_batches: int = 8

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("seq_len", 1), ("seed", 0),
                              ("batch_size", 1), ("batch_size_start", 1),
                              ("warmup_steps", 0), ("eval_every", 0),
                              ("eval_batches", 1)):
            check_int(name, getattr(self, name), minimum)
        if self.seed >= 2**40:  # seed * 100_003 + epoch must fit torch's 64 bits
            raise ValueError(f"seed ({self.seed}) must be < 2**40: the data order of "
                             "each pass is drawn from seed x 100003 + the pass")
        _check_rate("lr", self.lr, positive=True)
        for name in ("lr_decayed", "lr_final", "weight_decay", "mtp_lambda",
                     "mtp_lambda_late"):
            _check_rate(name, getattr(self, name), positive=False)
        _check_rate("grad_clip", self.grad_clip, positive=False,
                    why=" (0 switches clipping off)")
        for name in ("batch_warmup", "decay_start", "decay_end", "final_start",
                     "mtp_switch", "gamma_off", "fim_rate", "beta1", "beta2"):
            value = getattr(self, name)
            _check_rate(name, value, positive=False)
            if value > 1:
                raise ValueError(f"{name} ({value}) must be in [0, 1]")
        if not self.decay_start <= self.decay_end <= self.final_start:
            raise ValueError(f"decay_start ({self.decay_start}) <= decay_end "
                             f"({self.decay_end}) <= final_start "
                             f"({self.final_start}) must hold")
        if self.batch_size_start > self.batch_size:
            raise ValueError(f"batch_size_start ({self.batch_size_start}) must be "
                             f"<= batch_size ({self.batch_size})")
        if self.precision not in ("fp32", "bf16", "fp8"):
            raise ValueError(f"precision ({self.precision!r}) must be 'fp32', "
                             "'bf16' or 'fp8'")

    def replace(self, **changes) -> "TrainArgs":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def _token_counts(self) -> list[int]:
        """Tokens trained on before each step 0 .. steps (the last: the whole run)."""
        counts = [0]
        for step in range(self.steps):
            counts.append(counts[-1] + self.batch_size_at(step) * self.seq_len)
        return counts

    def in_tokens(self, **breakpoints: int | float) -> "TrainArgs":
        """A copy with schedule breakpoints given in tokens, as the report gives
        them: keywords from TOKEN_BREAKPOINTS, each an int (a count of tokens, e.g.
        469 * 10**9) or a float in [0, 1] (a fraction of the run's tokens).

        A breakpoint falls on the first step before which the run has trained on
        that many tokens (schedules change between steps) and is stored as that
        step / steps. batch_warmup is placed first, as the run's tokens depend on
        it: the batch grows over the fewest steps that train on its tokens. The
        warm-up stays in steps (report: 2K steps)."""
        unknown = sorted(set(breakpoints) - set(TOKEN_BREAKPOINTS))
        if unknown:
            raise TypeError(f"in_tokens takes {', '.join(TOKEN_BREAKPOINTS)}; "
                            f"not {', '.join(unknown)}")
        for name, value in breakpoints.items():
            _check_tokens(name, value)
        if not breakpoints:
            return self

        def target(value: int | float, counts: list[int]) -> float:
            return value if isinstance(value, int) else value * counts[-1]

        args = self
        if "batch_warmup" in breakpoints:
            value = breakpoints["batch_warmup"]

            def reached(k: int) -> bool:  # a ramp of k steps trains on `value`
                counts = self.replace(batch_warmup=k / self.steps)._token_counts()
                return counts[k] >= target(value, counts)

            if not reached(self.steps):
                raise ValueError(
                    f"batch_warmup ({value:,} tokens) must be <= the tokens of a "
                    f"run whose batch grows over all its {self.steps} steps")
            low, high = 0, self.steps  # the fewest steps: reached(high) holds
            while low < high:
                middle = (low + high) // 2
                low, high = (low, middle) if reached(middle) else (middle + 1, high)
            args = self.replace(batch_warmup=high / self.steps)
        counts = args._token_counts()
        changes = {}
        for name, value in breakpoints.items():
            if name == "batch_warmup":
                continue
            if target(value, counts) > counts[-1]:
                raise ValueError(f"{name} ({value:,} tokens) must be <= the run's "
                                 f"{counts[-1]:,} tokens")
            step = bisect.bisect_left(counts, target(value, counts))
            changes[name] = step / self.steps
        try:
            return args.replace(**changes)
        except ValueError as err:
            raise ValueError(f"the breakpoints in tokens ({breakpoints}) fall out of "
                             f"order: {err}") from None

    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based): linear warm-up, constant, cosine
        decay to lr_decayed x lr, constant, and a last constant lr_final x lr."""
        warmup = min(self.warmup_steps, self.steps)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = step / self.steps
        low = self.lr * self.lr_decayed
        if progress < self.decay_start:
            return self.lr
        if progress < self.decay_end:
            t = (progress - self.decay_start) / (self.decay_end - self.decay_start)
            return low + (self.lr - low) * 0.5 * (1 + math.cos(math.pi * t))
        if progress < self.final_start:
            return low
        return self.lr * self.lr_final

    def batch_size_at(self, step: int) -> int:
        """Sequences in step `step`: batch_size_start, growing in whole multiples
        of it over the first batch_warmup of the run, then batch_size."""
        progress = step / self.steps
        if progress >= self.batch_warmup:
            return self.batch_size
        levels = (self.batch_size - self.batch_size_start) // self.batch_size_start
        level = int(step * (levels + 1) / (self.batch_warmup * self.steps))
        return min(self.batch_size, self.batch_size_start * (1 + level))

    def mtp_lambda_at(self, step: int) -> float:
        return (self.mtp_lambda if step / self.steps < self.mtp_switch
                else self.mtp_lambda_late)

    def gamma_at(self, step: int, gamma: float) -> float:
        """The bias update speed: `gamma` (`ModelArgs.bias_update_speed`), 0 from
        gamma_off on."""
        return gamma if step / self.steps < self.gamma_off else 0.0


# The fractions of TrainArgs that the report gives in tokens (`TrainArgs.in_tokens`)
TOKEN_BREAKPOINTS = ("batch_warmup", "decay_start", "decay_end", "final_start",
                     "mtp_switch", "gamma_off")


def _check_tokens(name: str, value: object) -> None:
    """A clear TypeError / ValueError unless `value` is a count of tokens (an int
    >= 0) or a fraction of the run's tokens (a float in [0, 1])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} in tokens must be an int (a count) or a float (a "
                        f"fraction of the run's tokens), got {type(value).__name__}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name} ({value} tokens) must be >= 0")
    if isinstance(value, float) and not 0 <= value <= 1:
        raise ValueError(f"{name} ({value}) must be a fraction of the run's tokens "
                         "in [0, 1] (a count of tokens is an int)")


class _Objective(nn.Module):
    """`Transformer.loss` as a forward pass: DDP synchronises gradients through
    hooks it sets up in the forward of the module it wraps."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor,
                mtp_lambda: float) -> LossParts:
        return self.model.loss(tokens, targets, mtp_lambda)


class Trainer:
    """Trains a `Transformer` on a `Corpus` with `TrainArgs`:

        trainer = Trainer(model, corpus, TrainArgs(steps=300))
        history = trainer.train()       # or train(until=150), later train()

    Training sequences come from `corpus.packed("train", seq_len)`, in an order
    drawn afresh from the seed at each pass over them. Under `torchrun` (when
    torch.distributed is initialised) each process trains on its slice of every
    batch, in the same order as one process would, and DDP averages the gradients;
    the balance biases move by the expert load summed over all processes, so they
    stay identical everywhere (a batch-wise auxiliary loss, `aux_loss_alpha`, off in
    V3, is computed over each process's share). Evaluation and the progress bar run
    in process 0. A loss or gradient norm that is not finite stops training with a
    `FloatingPointError` (`not_finite`) before the step is applied.
    """

    def __init__(self, model: Transformer, corpus: Corpus, args: TrainArgs,
                 progress: bool | None = None):
        if not isinstance(model, Transformer):
            raise TypeError("model must be a dsv3_lite.model.Transformer, got "
                            f"{type(model).__name__}")
        if args.seq_len > model.args.max_seq_len:
            raise ValueError(f"seq_len ({args.seq_len}) must be <= the model's "
                             f"max_seq_len ({model.args.max_seq_len})")
        if (args.precision == "fp8") != model.args.fp8:
            raise ValueError(f"precision {args.precision!r} needs a model with "
                             f"ModelArgs.fp8={args.precision == 'fp8'}, this one "
                             f"has fp8={model.args.fp8}")
        if corpus.tokenizer.vocab_size > model.args.vocab_size:
            raise ValueError(f"the corpus' tokenizer has "
                             f"{corpus.tokenizer.vocab_size} tokens, more than the "
                             f"model's vocab_size ({model.args.vocab_size})")
        if corpus.fim_rate != args.fim_rate:
            raise ValueError(f"the corpus was built with fim_rate "
                             f"{corpus.fim_rate}, TrainArgs has {args.fim_rate}: "
                             "build it with Corpus(..., fim_rate=args.fim_rate, "
                             "seed=args.seed)")
        for split in ("train", "val"):
            length = len(corpus.split(split))
            if length <= args.seq_len:
                raise ValueError(f"seq_len ({args.seq_len}) must be < the corpus' "
                                 f"{split} split ({length} tokens): give more text "
                                 "or a shorter seq_len")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        for name in ("batch_size", "batch_size_start"):
            if getattr(args, name) % self.world_size:
                raise ValueError(f"{name} ({getattr(args, name)}) must be a multiple "
                                 f"of the number of processes ({self.world_size})")
        self.model, self.corpus, self.args = model, corpus, args
        self.device = _device_of(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in self.params if p.dim() >= 2],
              "weight_decay": args.weight_decay},
             {"params": [p for p in self.params if p.dim() < 2],  # norms, biases
              "weight_decay": 0.0}],
            lr=args.lr, betas=(args.beta1, args.beta2))
        self.objective: nn.Module = _Objective(model)
        if self.world_size > 1:
            lambdas = (args.mtp_lambda, args.mtp_lambda_late)
            cuda = self.device.type == "cuda"
            self.objective = DistributedDataParallel(
                self.objective,
                device_ids=[self.device.index] if cuda else None,
                # with lambda 0 the MTP modules get no gradient
                find_unused_parameters=model.args.mtp_depth > 0 and 0 in lambdas)
        self.sequences, _ = corpus.packed("train", args.seq_len)
        self.step = 0          # optimizer steps taken
        self.position = 0      # training sequences consumed, over all processes
        self.history = History()
        self.progress = progress

    # ------------------------------------------------------------------------ data
    def _order(self, epoch: int) -> torch.Tensor:
        """The order of the training sequences in pass `epoch` over them."""
        generator = torch.Generator().manual_seed(self.args.seed * 100_003 + epoch)
        return torch.randperm(len(self.sequences), generator=generator)

    def _batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of the next `size` sequences: inputs and targets."""
        n = len(self.sequences)
        index = torch.arange(self.position, self.position + size)
        rows = torch.cat([self._order(epoch)[index[index // n == epoch] % n]
                          for epoch in (index // n).unique().tolist()])
        share = size // self.world_size
        batch = self.sequences[rows[self.rank * share:(self.rank + 1) * share]]
        return batch[:, :-1], batch[:, 1:]

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.args.precision != "fp32")

    # ----------------------------------------------------------------------- steps
    def train_step(self) -> None:
        """One optimizer step, recorded in `history`."""
        args, step, start = self.args, self.step, time.perf_counter()
        size = args.batch_size_at(step)
        x, y = (t.to(self.device) for t in self._batch(size))
        with self._autocast():
            parts = self.objective(x, y, args.mtp_lambda_at(step))
        # the step's losses and expert load over all processes
        losses = torch.stack([parts.total, parts.main, parts.mtp]).detach().float()
        load = parts.expert_load
        if self.world_size > 1:
            dist.all_reduce(losses)
            losses /= self.world_size
            dist.all_reduce(load)
        total, main, mtp = losses.tolist()
        if not math.isfinite(total):
            raise not_finite(self.model, f"the training loss is {total}", step,
                             args.steps, f"a lower lr (now {args.lr}) or FP32 (now "
                                         f"{args.precision})")
        lr = args.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params,
                                              args.grad_clip or math.inf).item()
        if not math.isfinite(norm):  # clipping would make every weight NaN
            raise not_finite(self.model, f"the gradient norm is {norm}", step,
                             args.steps, f"a lower lr (now {args.lr}) or FP32 (now "
                                         f"{args.precision})")
        self.optimizer.step()
        gamma = args.gamma_at(step, self.model.args.bias_update_speed)
        moes = self.model.moe_layers()
        for moe, layer_load in zip(moes, load):
            moe.update_bias(layer_load, gamma)
        ran = [layer_load for layer_load in load if layer_load.sum() > 0]
        self.step += 1
        self.position += size
        h = self.history
        h.train_loss.append(total)
        h.main_loss.append(main)
        h.mtp_loss.append(mtp)
        h.lr.append(lr)
        h.batch_size.append(size)
        h.grad_norm.append(norm)
        h.max_violation.append(sum(map(max_violation, ran)) / max(1, len(ran)))
        h.tokens_per_s.append(size * args.seq_len / (time.perf_counter() - start))
        if self.rank == 0 and ((args.eval_every and self.step % args.eval_every == 0)
                               or self.step == args.steps):
            loss, by_domain = self.evaluate()
            h.val_loss.append((self.step, loss))
            h.val_by_domain.append((self.step, by_domain))

    def train(self, until: int | None = None,
              after_step: Callable[[Trainer], None] | None = None) -> History:
        """Train from the current step up to step `until` (default: the end of the
        run) and return the history of the whole run. `after_step(trainer)` runs
        after every step (e.g. to save a checkpoint now and then). A progress bar
        shows unless `progress=False` or the environment sets tqdm's
        TQDM_DISABLE."""
        until = self.args.steps if until is None else until
        check_int("until", until, self.step)
        if until > self.args.steps:
            raise ValueError(f"until ({until}) must be <= steps ({self.args.steps})")
        progress = self.progress
        if progress is None:  # tqdm's notebook bar ignores TQDM_DISABLE
            progress = not os.environ.get("TQDM_DISABLE")
        self.model.train()
        with tqdm(total=self.args.steps, initial=self.step, desc="training",
                  disable=not progress or self.rank != 0) as bar:
            while self.step < until:
                self.train_step()
                h = self.history
                bar.update()
                bar.set_postfix(loss=f"{h.main_loss[-1]:.3f}", lr=f"{h.lr[-1]:.2e}",
                                batch=h.batch_size[-1], refresh=False)
                if after_step is not None:
                    after_step(self)
        return self.history

    def evaluate(self) -> tuple[float, dict[str, float]]:
        """Mean validation loss, overall and per domain, on fixed windows
        (`evaluate` with the run's batch size, sequence length and precision)."""
        with self._autocast():
            return evaluate(self.model, self.corpus, "val", self.args.batch_size,
                            self.args.seq_len, self.args.eval_batches,
                            by_domain=True)

    def balance_biases_agree(self) -> bool:
        """Whether every process holds the same balance biases (a collective:
        every process must call it). Always true in one process."""
        biases = torch.cat([moe.gate.bias for moe in self.model.moe_layers()])
        if self.world_size == 1:
            return True
        low, high = biases.clone(), biases.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return bool(torch.equal(low, high))

    # ----------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the weights: the step (and with it
        every schedule's position), the data position, the optimizer's moments,
        the random number generators' states and the history so far."""
        return {
            "step": self.step,
            "position": self.position,
            "optimizer": self.optimizer.state_dict(),
            "history": dataclasses.asdict(self.history),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": (torch.cuda.get_rng_state_all()
                             if torch.cuda.is_available() else [])},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`; the model's weights are loaded apart."""
        missing = {"step", "position", "optimizer", "history", "rng"} - set(state)
        if missing:
            raise ValueError(f"the trainer state lacks {sorted(missing)}")
        step, position = state["step"], state["position"]
        check_int("the trainer state's step", step, 0)
        check_int("the trainer state's position", position, 0)
        if step > self.args.steps:
            raise ValueError(f"the trainer state is at step {step}, outside "
                             f"this run's 0 .. {self.args.steps} steps")
        # each step takes between batch_size_start and batch_size sequences
        low, high = sorted((self.args.batch_size_start, self.args.batch_size))
        if not step * low <= position <= step * high:
            raise ValueError(f"the trainer state's position ({position:,} sequences) "
                             f"cannot follow {step} steps of {low} to {high} "
                             "sequences: the state is corrupt or was edited")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise ValueError("the optimizer state does not fit this model's "
                             f"parameters: {err}") from None
        self.step, self.position = step, position
        self.history = History.from_dict(state["history"])
        try:
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
            if torch.cuda.is_available() and state["rng"]["cuda"]:
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        except (RuntimeError, TypeError, ValueError, KeyError) as err:
            raise ValueError("the trainer state's random number generator states "
                             f"are corrupt or were edited ({err})") from None


__all__ = ["TrainArgs", "Trainer", "History", "evaluate", "Precision",
           "TOKEN_BREAKPOINTS"]
