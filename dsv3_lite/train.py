"""Training: the chapters' small helper, and the command line of the full recipe.

`train_lm` is the seeded loop the chapters run their experiments with (report 4.2's
optimizer settings: AdamW with beta = (0.9, 0.95), weight decay 0.1, gradient
clipping at 1.0; linear warm-up then cosine decay to 10% of the peak learning rate),
on random windows of a `Corpus`. Deterministic on a CPU for a fixed seed and thread
count.

The command line trains a model with the whole recipe (`dsv3_lite.trainer`) on the
book's corpus, a byte-level BPE tokenizer learned from it, and saves checkpoints
(`dsv3_lite.checkpoint`) as step folders of the run folder --out (the newest --keep
of them; a save is complete or absent, and --resume takes the newest sound one):

    python -m dsv3_lite.train --preset tiny --steps 2000 --seed 0 --out runs/tiny
    python -m dsv3_lite.train --out runs/tiny --resume         # continue a run
    python -m dsv3_lite.train --out runs/tiny --resume --steps 3000  # extend it
    python -m dsv3_lite.train ... --export checkpoints/tiny    # + an inference copy
    python -m dsv3_lite.train --out runs/tiny --export-only checkpoints/tiny
    torchrun --nproc_per_node 2 -m dsv3_lite.train --out runs/ddp ...  # DDP

Every ModelArgs and TrainArgs field is an option (--dim 96, --lr 1e-3, ...), and the
schedules' breakpoints can be given in tokens, as the report's are: a fraction of the
run's tokens (--decay_start_tokens 0.676, the report's 10T of 14.8T) or a count
(--batch_warmup_tokens 300K). `python -m dsv3_lite.train --help` lists them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from dsv3_lite.checkpoint import (FILES, MANIFEST, export, export_problem, flushed,
                                  load_checkpoint, save_step, sha256, steps_of,
                                  write_file)
from dsv3_lite.config import ModelArgs, check_int
from dsv3_lite.data import (TEXT_LIMIT, VAL_EVERY, Corpus, Document, build_documents,
                            read_documents)
from dsv3_lite.model import Transformer, check_fits_in_memory
from dsv3_lite.tokenizer import BPETokenizer
from dsv3_lite.trainer import (TOKEN_BREAKPOINTS, History, Trainer, TrainArgs,
                               _check_rate, _cross_entropy, _device_of, evaluate,
                               not_finite)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
StepHook = Callable[[nn.Module, int], None]


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of `model(x)` (logits of shape (batch, seq, vocab))
    against `y`."""
    return _cross_entropy(model(x), y)


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
    own TQDM_DISABLE (as the notebook tests do). A loss or gradient that is not
    finite stops training with a `FloatingPointError` (`trainer.not_finite`).
    """
    for name, value, minimum in (
            ("steps", steps, 1), ("batch_size", batch_size, 1),
            ("seq_len", seq_len, 1), ("eval_every", eval_every, 0),
            ("eval_batches", eval_batches, 1)):
        check_int(name, value, minimum)
    _check_rate("lr", lr, positive=True)
    _check_rate("weight_decay", weight_decay, positive=False)
    _check_rate("grad_clip", grad_clip, positive=False,
                why=" (0 switches clipping off; a negative one would turn descent "
                    "into ascent)")
    if warmup is None:
        warmup = max(1, steps // 10)
    check_int("warmup", warmup, 0)
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
            raise not_finite(model, f"the training loss is {value}", step, steps,
                             f"FP32 or BF16 instead of FP16, a lower lr (now {lr}), "
                             f"or gradient clipping (grad_clip now {grad_clip})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf).item()
        if not math.isfinite(norm):
            bar.close()
            raise not_finite(model, f"the gradient norm is {norm}", step, steps,
                             "FP32 or BF16 instead of FP16, or a lower lr "
                             f"(now {lr})")
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


# ------------------------------------------------------------------- the command line
# ModelArgs.tiny's vocabulary is the 260 tokens of the byte tokenizer; the command
# line trains a BPE tokenizer to `vocab_size` tokens, 1,024 unless set.
PRESETS: dict[str, Callable[[], ModelArgs]] = {
    "tiny": lambda: ModelArgs.tiny(vocab_size=1024),
    "small": ModelArgs.small,
}
MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelArgs) if f.name != "fp8"]
TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainArgs)]
DATA_DEFAULTS = {"text": None, "docs_per_domain": 6000}
# also recorded with the data options, and checked by --resume
RECORDED = ("preset", "text_sha256")
TOKEN_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
SCHEDULES_HELP = (
    "Every schedule is a function of step / --steps: the fractions above "
    "(--decay_start 0.676, ...) are of the run's steps. The report gives its "
    "breakpoints in tokens; a --NAME_tokens option places one by tokens instead, at "
    "the first step by which the run has trained on that many (the batch ramp first, "
    "as the run's tokens depend on it). --warmup_steps stays in steps, as in the "
    "report. --resume --steps N extends a run to N steps: from the step reached on, "
    "every schedule is that of an N-step run (so a finished run's learning rate may "
    "rise again); resuming with the run's own --steps continues it bit for bit.")


def _tokens(text: str) -> int | float:
    """A --NAME_tokens value: a count (an integer, or a number with a K, M, B or T
    suffix: 469B) or a fraction of the run's tokens (a number in [0, 1])."""
    scale = TOKEN_SUFFIXES.get(text[-1:].upper())
    number = text[:-1] if scale else text
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if scale or number.isdigit():
        if math.isfinite(value) and value >= 0:
            return round(value * (scale or 1))
    elif 0 <= value <= 1:
        return value
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a fraction of the run's tokens in [0, 1] nor a count "
        "of tokens (an integer, or a number with K, M, B or T: 469B)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dsv3_lite.train",
        usage="%(prog)s --out DIR [--resume] [--preset {tiny,small}] [options]",
        description="Train a DeepSeek-V3-style model with the report's recipe on the "
                    "book's corpus (or --text) and save a checkpoint in --out.",
        epilog=SCHEDULES_HELP)
    parser.add_argument("--out", type=pathlib.Path, required=True,
                        help="run folder: its checkpoints are its step-NNNNNNNN "
                             "folders")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved in --out (with a larger "
                             "--steps: extend it, see the end of this help)")
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="model shape (tiny: ModelArgs.tiny with a 1,024-token "
                             "vocabulary; small: ModelArgs.small)")
    parser.add_argument("--text", default=argparse.SUPPRESS,
                        help="train on this UTF-8 file (paragraphs are documents) "
                             "instead of the book's corpus")
    parser.add_argument("--docs-per-domain", type=int, default=argparse.SUPPRESS,
                        help="size of the book's corpus (default 6000)")
    parser.add_argument("--text-limit", type=int, default=TEXT_LIMIT // 2**20,
                        metavar="MB", help="refuse a --text file larger than this "
                                           f"(default {TEXT_LIMIT // 2**20} MB)")
    release = parser.add_mutually_exclusive_group()
    release.add_argument("--export", type=pathlib.Path, metavar="DIR",
                         help="at the end, also copy the checkpoint without its "
                              "trainer state to DIR (a release: what inference "
                              "needs); DIR must be new, empty or an earlier release")
    release.add_argument("--export-only", type=pathlib.Path, metavar="DIR",
                         help="train nothing: copy the checkpoint in --out to DIR "
                              "as --export does, and stop")
    parser.add_argument("--overwrite", action="store_true",
                        help="let a new run replace a non-empty --out, and --export "
                             "replace a DIR that is not a release")
    parser.add_argument("--save-every", type=int, default=0,
                        help="steps between checkpoints (default: at the end only)")
    parser.add_argument("--keep", type=int, default=2,
                        help="checkpoints kept in --out, the newest (default 2)")
    parser.add_argument("--stop-at", type=int,
                        help="stop after this step with a checkpoint, as an "
                             "interruption would; --resume continues")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="default: cuda when available")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (on a machine busy with other "
                             "jobs, 1 keeps threads from waiting on each other)")
    model = parser.add_argument_group(
        "model", "ModelArgs fields (default: the preset's; --precision fp8 sets fp8)")
    tiny = PRESETS["tiny"]()
    for name in MODEL_FIELDS:
        model.add_argument(f"--{name}", type=type(getattr(tiny, name)),
                           default=argparse.SUPPRESS, metavar=name.upper(),
                           help=f"(preset tiny: {getattr(tiny, name)})")
    train = parser.add_argument_group(
        "training", "TrainArgs fields (precision: default bf16 on a GPU, else fp32)")
    for f in dataclasses.fields(TrainArgs):
        train.add_argument(f"--{f.name}", type=type(f.default),
                           default=argparse.SUPPRESS, metavar=f.name.upper(),
                           help=f"(default {f.default})")
    tokens = parser.add_argument_group(
        "schedules in tokens", "instead of the fraction of the same name: a fraction "
        "of the run's tokens (0.676) or a count (300K, 2.5M, 50000); report 4.2: "
        "batch 469B, decay 10T to 14.3T, final 14.633T, MTP 10T, gamma 14.3T "
        "of 14.8T")
    for name in TOKEN_BREAKPOINTS:
        tokens.add_argument(f"--{name}_tokens", type=_tokens, metavar="TOKENS",
                            default=argparse.SUPPRESS)
    return parser


def _start_processes(device: str | None) -> tuple[int, int, torch.device]:
    """Rank, number of processes and device of this process. Under torchrun (which
    sets WORLD_SIZE, RANK, LOCAL_RANK and where to meet) the processes form a group:
    NCCL between GPUs, one GPU per process, or gloo between CPU processes."""
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    return rank, world_size, torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def _documents(data: dict[str, Any], text_limit: int) -> list[Document]:
    if data["text"] is None:
        documents = build_documents(data["docs_per_domain"])
        source, why = f"--docs-per-domain {data['docs_per_domain']} makes", ""
    else:
        documents = read_documents(data["text"], text_limit * 2**20)
        source = f"--text {data['text']} holds"
        why = (": a document is a paragraph, and paragraphs are separated by a "
                "blank line")
    if len(documents) < VAL_EVERY:
        raise ValueError(f"{source} {len(documents)} documents, and training needs "
                         f"at least {VAL_EVERY} (every {VAL_EVERY}th is held out for "
                         f"validation){why}")
    return documents


def _check_unchanged(saved: dict[str, Any], given: dict[str, Any]) -> None:
    changed = [f"--{k} {v} (saved: {saved[k]})" for k, v in given.items()
               if saved[k] != v]
    if changed:
        raise ValueError(f"{', '.join(changed)}: a resumed run keeps the settings "
                         "it was saved with; start a new run in another --out to "
                         "change them")


def _check_recorded(saved: dict[str, Any], opts: argparse.Namespace) -> None:
    """--resume: the preset and the --text file are the run's recorded ones."""
    if opts.preset is not None and opts.preset != saved.get("preset"):
        raise ValueError(f"--preset {opts.preset} (saved: {saved.get('preset')}): a "
                         "resumed run keeps the settings it was saved with")
    if saved["text"] is not None:
        text = pathlib.Path(saved["text"])
        if not text.is_file():
            raise FileNotFoundError(f"--text {text}: the run's text file is gone")
        if sha256(text) != saved.get("text_sha256"):
            raise ValueError(f"--text {text}: the file changed since the run started "
                             f"(its SHA-256 hash differs from the recorded one, "
                             f"{saved.get('text_sha256')}); a resumed run must read "
                             "the same data")


def _resumable(opts: argparse.Namespace, device: torch.device):
    """The newest sound checkpoint of the run folder --out, and notes on any newer
    one skipped."""
    if not steps_of(opts.out):
        legacy = (opts.out / "config.json").is_file()
        if legacy and not (opts.out / MANIFEST).exists():
            raise ValueError(f"{opts.out} is a single-folder checkpoint without a "
                             f"{MANIFEST} (from an older dsv3_lite): it cannot be "
                             "verified, so it is not resumed; --export-only makes a "
                             "release of it")
        if opts.out.is_dir() and not (opts.out / "config.json").exists():
            raise ValueError(f"{opts.out} holds no complete checkpoint to resume "
                             "(was the run stopped before its first save?): start it "
                             "again, with --overwrite")
    saved = load_checkpoint(opts.out, device)
    if saved.trainer_state is None:
        raise ValueError(f"{opts.out} holds no trainer state to resume (a "
                         "copy made for inference?)")
    return saved


class _Setup(NamedTuple):
    """A new run, or the run saved in --out with --resume (then `state` is its
    trainer state, and `saved_steps` the steps it was saved with)."""

    model: Transformer
    tokenizer: BPETokenizer
    train_args: TrainArgs
    data: dict[str, Any]
    documents: list[Document]
    state: dict[str, Any] | None = None
    saved_steps: int | None = None
    path: pathlib.Path | None = None
    skipped: tuple[str, ...] = ()


def _setup(opts: argparse.Namespace, device: torch.device) -> _Setup:
    given = vars(opts)
    model_given = {k: given[k] for k in MODEL_FIELDS if k in given}
    train_given = {k: given[k] for k in TRAIN_FIELDS if k in given}
    data_given = {k: given[k] for k in DATA_DEFAULTS if k in given}
    tokens_given = {k: given[f"{k}_tokens"] for k in TOKEN_BREAKPOINTS
                    if f"{k}_tokens" in given}
    both = [k for k in tokens_given if k in train_given]
    if both:
        raise ValueError(f"--{both[0]} and --{both[0]}_tokens set the same "
                         "breakpoint: give one of them")
    if opts.resume:
        if tokens_given:
            raise ValueError(f"--{next(iter(tokens_given))}_tokens: a resumed run "
                             "keeps the breakpoints it was saved with")
        saved = _resumable(opts, device)
        extended = "steps" in train_given
        steps = train_given.pop("steps", saved.train_args.steps)
        _check_unchanged(dataclasses.asdict(saved.model.args), model_given)
        _check_unchanged(dataclasses.asdict(saved.train_args), train_given)
        _check_unchanged(saved.data, data_given)
        _check_recorded(saved.data, opts)
        taken = saved.trainer_state["step"]
        if not extended and steps < taken:
            raise ValueError(f"{saved.path / 'trainer_state.pt'} is at step {taken}, "
                             f"beyond the run's {steps} steps: it is corrupt or was "
                             "edited")
        if steps < taken:
            raise ValueError(f"--steps ({steps}) must be >= the {taken} steps the "
                             f"run in {opts.out} has taken")
        return _Setup(saved.model, saved.tokenizer,
                      saved.train_args.replace(steps=steps), saved.data,
                      _documents(saved.data, opts.text_limit), saved.trainer_state,
                      saved.train_args.steps, saved.path, saved.skipped)
    if opts.out.exists() and not opts.overwrite:
        if steps_of(opts.out) or (opts.out / "config.json").exists():
            raise ValueError(f"{opts.out} already holds a checkpoint: add --resume "
                             "to continue it, or choose another --out")
        if not opts.out.is_dir() or any(opts.out.iterdir()):
            raise ValueError(f"{opts.out} exists and is not an empty folder: choose "
                             "another --out, or add --overwrite to replace it")
    if "precision" not in train_given:
        train_given["precision"] = "bf16" if device.type == "cuda" else "fp32"
    if "text" in data_given:
        data_given["text"] = str(pathlib.Path(data_given["text"]).resolve())
    data = {**DATA_DEFAULTS, **data_given, "preset": opts.preset or "tiny"}
    train_args = TrainArgs(**train_given)
    try:
        train_args = train_args.in_tokens(**tokens_given)
    except ValueError as err:
        options = ", ".join(f"--{k}_tokens" for k in tokens_given)
        raise ValueError(f"{options}: {err}") from None
    args = PRESETS[data["preset"]]().replace(fp8=train_args.precision == "fp8",
                                          **model_given)
    check_fits_in_memory(args)  # before the tokenizer learns a vocab_size of tokens
    documents = _documents(data, opts.text_limit)  # checks the file before hashing
    data["text_sha256"] = sha256(data["text"]) if data["text"] is not None else None
    size = sum(len(d.text) for d in documents)
    print(f"learning a BPE tokenizer of {args.vocab_size:,} tokens from "
          f"{len(documents):,} documents ({size:,} characters)", file=sys.stderr)
    tokenizer = BPETokenizer.train((d.text for d in documents), args.vocab_size,
                                   progress=True)
    if tokenizer.vocab_size < args.vocab_size:
        print(f"the corpus yields only {tokenizer.vocab_size} BPE tokens: "
              f"vocab_size {args.vocab_size} -> {tokenizer.vocab_size}")
        args = args.replace(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(train_args.seed)
    model = Transformer(args).to(device)  # drawn on the CPU, the same everywhere
    return _Setup(model, tokenizer, train_args, data, documents)


def _check_writable(out: pathlib.Path) -> None:
    """Before the first step: --out can hold the run's checkpoints."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"--out {out}: cannot save checkpoints there "
                      f"({err.strerror or err}); choose a writable folder") from None


def _check_release_target(option: str, target: pathlib.Path, out: pathlib.Path,
                          overwrite: bool) -> None:
    """Exporting replaces `target`: it must be new, empty or a release."""
    if target.resolve() == out.resolve():
        raise ValueError(f"{option} ({target}) must differ from --out")
    problem = export_problem(target)
    if problem and not overwrite:
        raise ValueError(f"{option} ({target}) {problem}; choose a new or empty "
                         "directory (--overwrite replaces it)")


def _warmup_warning(args: TrainArgs) -> str | None:
    if args.warmup_steps > args.steps:
        return (f"warning: --warmup_steps ({args.warmup_steps}) is longer than the "
                f"run ({args.steps} steps): the learning rate warms up over all "
                f"{args.steps} steps and reaches --lr ({args.lr:g}) only at the last")
    return None


def _export_only(opts: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--export-only: copy the checkpoint in --out to a release, train nothing."""
    names = {action.dest: action.option_strings[0] for action in parser._actions}
    options = [names[k] for k, v in vars(opts).items()
               if k not in ("out", "export_only", "overwrite")
               and v != parser.get_default(k)]
    if options:
        parser.error(f"--export-only trains nothing: drop {', '.join(options)}")
    try:
        _check_release_target("--export-only", opts.export_only, opts.out,
                              opts.overwrite)
        saved = load_checkpoint(opts.out)
        export(opts.out, opts.export_only, overwrite=opts.overwrite)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    step = saved.trainer_state["step"] if saved.trainer_state else None
    where = (f"step {step} of {saved.train_args.steps}" if step is not None
             else "a release")
    for note in saved.skipped:
        print(note, file=sys.stderr)
    print(f"exported {opts.out} ({where}) without its trainer state, for "
          f"inference: {opts.export_only}")


def _describe(trainer: Trainer, tokenizer: BPETokenizer, out: pathlib.Path) -> str:
    m, a, corpus = trainer.model, trainer.args, trainer.corpus
    lines = [
        f"model: {m.num_params():,} parameters (MTP: "
        f"+{m.num_params(mtp=True) - m.num_params():,}), {m.args.n_layers} layers, "
        f"dim "
        f"{m.args.dim}, {m.args.n_routed_experts} routed experts (top "
        f"{m.args.n_activated_experts}), {a.precision} on {trainer.device}"
        + (f", {trainer.world_size} processes" if trainer.world_size > 1 else ""),
        f"data: {corpus!r}, {len(trainer.sequences):,} training sequences of "
        f"{a.seq_len} tokens, FIM rate {a.fim_rate}",
        f"run: {a.steps} steps, batch {a.batch_size_start} -> {a.batch_size}, lr "
        f"{a.lr:g}, seed {a.seed}; checkpoint in {out}",
    ]
    return "\n".join(lines)


def _validation(history: History) -> str:
    step, by_domain = history.val_by_domain[-1]
    domains = ", ".join(f"{name} {loss:.3f}" for name, loss in by_domain.items())
    return (f"step {step}: validation loss {history.val_loss[-1][1]:.4f} "
            f"nats/token ({domains})")


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring and --help)."""
    parser = _parser()
    opts = parser.parse_args(argv)
    if not str(opts.out).strip() or opts.out == pathlib.Path():
        parser.error(f"--out ({str(opts.out)!r}) must name a run folder, not the "
                     "current one")
    for option, value, minimum in (("--save-every", opts.save_every, 0),
                                   ("--keep", opts.keep, 1),
                                   ("--threads", opts.threads, 1),
                                   ("--text-limit", opts.text_limit, 1)):
        if value is not None and value < minimum:
            parser.error(f"{option} ({value}) must be >= {minimum}")
    cores = os.cpu_count() or 1
    if opts.threads is not None and opts.threads > 4 * cores:
        parser.error(f"--threads ({opts.threads}) must be <= 4 x this machine's "
                     f"{cores} cores: more threads only wait on each other")
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here (a CPU build of "
                     f"torch, {torch.__version__}, or no driver); leave --device out "
                     "or give --device cpu")
    if opts.export_only:
        return _export_only(opts, parser)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    rank, world_size, device = _start_processes(opts.device)
    try:
        _run(opts, parser, rank, world_size, device)
    finally:  # an error or an interrupt must not leave the process group open
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(opts: argparse.Namespace, parser: argparse.ArgumentParser, rank: int,
         world_size: int, device: torch.device) -> None:
    say = print if rank == 0 else (lambda *_, **__: None)
    try:
        if opts.export:
            _check_release_target("--export", opts.export, opts.out, opts.overwrite)
        run = _setup(opts, device)
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.error(str(err))
    if rank == 0 and opts.overwrite and not opts.resume and opts.out.exists():
        if opts.out.is_dir() and not opts.out.is_symlink():
            shutil.rmtree(opts.out)
        else:
            opts.out.unlink()
    model, tokenizer, train_args = run.model, run.tokenizer, run.train_args
    data = run.data
    corpus = Corpus(run.documents, tokenizer=tokenizer,
                    fim_rate=train_args.fim_rate, seed=train_args.seed)
    try:
        trainer = Trainer(model, corpus, train_args)
        if rank == 0:
            _check_writable(opts.out)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if run.state is not None:
        try:
            trainer.load_state_dict(run.state)
        except (ValueError, TypeError) as err:
            parser.error(f"{run.path / 'trainer_state.pt'}: {err}")
        for note in run.skipped:
            say(note)
        say(f"resuming {opts.out} from {run.path.name} (step {trainer.step} of "
            f"{train_args.steps})")
    if run.saved_steps not in (None, train_args.steps):
        lr = trainer.history.lr
        say(f"extended from {run.saved_steps} to {train_args.steps} steps: from step "
            f"{trainer.step + 1} on, the schedules are those of a run of "
            f"{train_args.steps} steps"
            + (f" (learning rate {lr[-1]:.3g} at step {trainer.step}, "
               f"{train_args.lr_at(trainer.step):.3g} at step {trainer.step + 1})"
               if lr else ""))
    if trainer.step >= train_args.steps:
        parser.error(f"the run in {opts.out} is complete (step {trainer.step} of "
                     f"{train_args.steps}): nothing to resume; a larger --steps "
                     "extends it")
    stop = train_args.steps if opts.stop_at is None else opts.stop_at
    if not trainer.step < stop <= train_args.steps:
        parser.error(f"--stop-at ({stop}) must be > the step reached "
                     f"({trainer.step}) and <= --steps ({train_args.steps})")
    warning = _warmup_warning(train_args)
    if warning and rank == 0:
        print(warning, file=sys.stderr)
    say(_describe(trainer, tokenizer, opts.out))

    saved = []

    def save(last: bool = False) -> None:
        """A checkpoint; the last one waits until it is on the disk."""
        if rank != 0:
            return
        try:
            saved.append(save_step(opts.out, model, tokenizer, trainer, data,
                                   keep=opts.keep))
            write_file(opts.out / "history.json",
                       json.dumps(dataclasses.asdict(trainer.history)) + "\n")
            if last:
                flushed(opts.out)
        except OSError as err:
            sys.exit(f"error: {err}")

    def after_step(trainer: Trainer) -> None:
        history = trainer.history
        if rank == 0 and history.val_loss and history.val_loss[-1][0] == trainer.step:
            tqdm.write(_validation(history))
        if opts.save_every and trainer.step % opts.save_every == 0:
            save()

    try:
        trainer.train(until=stop, after_step=after_step)
    except KeyboardInterrupt:
        save(last=True)
        say(f"interrupted at step {trainer.step}: checkpoint in {opts.out}; "
            "continue with --resume")
        sys.exit(130)
    save(last=True)
    speed = sorted(trainer.history.tokens_per_s)
    if speed:
        say(f"median {speed[len(speed) // 2]:,.0f} tokens/s (all processes)")
    if world_size > 1:
        agree = trainer.balance_biases_agree()
        say(f"balance biases identical on all {world_size} processes: {agree}")
    say(f"checkpoint at step {trainer.step}: {saved[-1] if saved else opts.out} "
        f"({', '.join(FILES)}, {MANIFEST}); history in {opts.out / 'history.json'}")
    if opts.export and trainer.step < train_args.steps:
        say(f"not exported to {opts.export}: the run stopped before its last step")
    elif opts.export and rank == 0:
        export(opts.out, opts.export, overwrite=opts.overwrite)
        say(f"for inference, without the trainer state: {opts.export}")


if __name__ == "__main__":
    main()
