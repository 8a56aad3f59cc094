"""Re-count how dsv3_lite handles bad and unusual input: a catalogue of probes, run in this process.

    python tools/probe_inputs.py             # every probe: counts per area, then each probe to fix
    python tools/probe_inputs.py --list      # the probes (area/name, expectation, names), not run
    python tools/probe_inputs.py -k resume   # only the probes whose area/name contains 'resume'

Each probe hands one public API or command line of the package one bad or unusual input, or one
fault (an option value, a damaged or edited file, a hostile index entry, bytes on the chat's
standard input, a kill -9 during a save), and sorts the outcome into one of five classes:

    clear    refused with a clear error that names the field, option or path and the rule
    ok       accepted, and the result is correct
    unclear  a raw exception from deep inside, an error that names neither the input nor the
             rule, or a hang
    silent   accepted with a wrong result, and no word
    loss     data that existed before the probe (a run, a release, a user's files) was changed or
             destroyed

Each probe states beforehand what it expects and what it names, and the verdict is mechanical:

  * refuse: an exception is clear only if (a) it is a ValueError, TypeError, FileNotFoundError,
    FileExistsError, FloatingPointError or an OSError with a message, or a command line's exit
    status 2 with its message on stderr (argparse's `parser.error`, the chat's own `return 2`;
    the message is taken from the last 'error: ' line on), and (b) the message contains one of
    the probe's names (the option, field or path the user gave) as a whole word ('lr' does not
    match 'already'). Any other exception is unclear. Accepted: silent.
  * accept: the probe's check of the result (an output equal to a reference, a run that resumes
    bit for bit, ...) passes: ok; fails: silent. Any exception: unclear.
  * either: a refusal is judged as for refuse, an acceptance as for accept.
  * A probe that guards data (`Ctx.keep`: the files and their SHA-256 hashes, links and
    folders) is loss if any of it changed, vanished or appeared, whatever else happened.
  * A probe that runs longer than TIMEOUT seconds (signal.alarm) is unclear (a hang).
  * harness: the probe's own set-up failed (a bug of this script, not a verdict on the package).

Probes run in this process, each in a fresh temporary folder that is also the working directory,
with torch's thread count restored afterwards. A subprocess is used only where the fault needs
one: a kill -9, or a value that would exhaust this process's threads or memory (it runs under a
memory limit, and its own timeout is TIMEOUT less 5 s, so that it can be killed and reaped). The
models are tiny (the command line uses tests/test_train.py's `CLI` configuration, about 0.1 s a
run; generation and chat use the book's shipped checkpoint), and shared inputs are built once.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402

from dsv3_lite.chat import main as chat_main  # noqa: E402
from dsv3_lite.checkpoint import (BOOK_CHECKPOINT, MANIFEST, export, flushed,  # noqa: E402
                                  load_checkpoint, save_checkpoint, save_step, sha256, steps_of,
                                  verify_manifest)
from dsv3_lite.client import Client  # noqa: E402
from dsv3_lite.config import ModelArgs  # noqa: E402
from dsv3_lite.data import Corpus, Document, build_documents, read_documents  # noqa: E402
from dsv3_lite.generate import generate, stream  # noqa: E402
from dsv3_lite.hf import from_hf, load_release, save_release  # noqa: E402
from dsv3_lite.model import Transformer  # noqa: E402
from dsv3_lite.tokenizer import BPETokenizer  # noqa: E402
from dsv3_lite.train import main as train_main  # noqa: E402
from dsv3_lite.trainer import Trainer, TrainArgs  # noqa: E402

TIMEOUT = 60  # seconds a probe may take
VERDICTS = ("clear", "ok", "unclear", "silent", "loss")
CLEAR_TYPES = (ValueError, TypeError, FileNotFoundError, FileExistsError, FloatingPointError)
# tests/test_train.py's tiny command-line configuration: a run takes about 0.1 s
CLI = ["--docs-per-domain", "8", "--vocab_size", "300", "--dim", "32", "--inter_dim", "64",
       "--moe_inter_dim", "16", "--n_layers", "2", "--n_heads", "2", "--q_lora_rank", "16",
       "--kv_lora_rank", "16", "--qk_nope_head_dim", "8", "--qk_rope_head_dim", "8",
       "--v_head_dim", "8", "--steps", "8", "--seq_len", "32", "--batch_size", "4",
       "--batch_size_start", "2", "--batch_warmup", "0.3", "--warmup_steps", "2",
       "--eval_batches", "2"]
SESSION = pathlib.Path()  # the temporary folder of this run (set by `main`)


# --------------------------------------------------------------------------- probes and verdicts
class Hang(BaseException):
    """The probe ran past TIMEOUT."""


class HarnessError(Exception):
    """The probe's own set-up failed: a bug of this script."""


class Crashed(Exception):
    """A subprocess ended with an exit status other than 0 or 2."""


@dataclasses.dataclass
class Probe:
    area: str
    name: str
    action: Callable[["Ctx"], Any]
    expect: str = "refuse"  # "refuse", "accept" or "either"
    names: tuple[str, ...] = ()
    check: Callable[["Ctx", Any], str | None] | None = None  # None if right, else what is wrong

    @property
    def id(self) -> str:
        return f"{self.area}/{self.name}"


class Ctx:
    """A probe's fresh folder (also the working directory) and the data it guards."""

    def __init__(self, tmp: pathlib.Path):
        self.tmp = tmp
        self.kept: dict[pathlib.Path, dict[str, str]] = {}

    def keep(self, *paths: pathlib.Path) -> None:
        """Guard `paths` as they are now: the probe is loss if any of it changes."""
        for path in paths:
            self.kept[path] = snapshot(path)

    def losses(self) -> str:
        problems = []
        for path, before in self.kept.items():
            after = snapshot(path)
            for what, names in (("lost", before.keys() - after.keys()),
                                ("changed", {n for n in before.keys() & after.keys()
                                             if before[n] != after[n]}),
                                ("appeared", after.keys() - before.keys())):
                if names:
                    problems.append(f"{path.name}: {what} {', '.join(sorted(names)[:4])}")
        return "; ".join(problems)


def snapshot(path: pathlib.Path) -> dict[str, str]:
    """Every entry under `path` (not following links): a file's SHA-256, a link's target."""
    def entry(p: pathlib.Path) -> str:
        if p.is_symlink():
            return "link " + os.readlink(p)
        return "file " + sha256(p) if p.is_file() else "folder"

    if not path.exists() and not path.is_symlink():
        return {}
    entries = {".": entry(path)}
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                p = pathlib.Path(folder, name)
                entries[str(p.relative_to(path))] = entry(p)
    return entries


def _named(message: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(n)}(?![\w-])", message) for n in names)


def _refusal(error: BaseException, stderr: str) -> tuple[bool, str]:
    """Whether `error` is of a kind that can be clear, and its message."""
    if isinstance(error, SystemExit):
        lines = [m.start() for m in re.finditer(r"(?m)^(?:\S[^\n]*?: )?error: ", stderr)]
        message = stderr[lines[-1]:].strip() if lines else stderr.strip()
        return error.code == 2, f"exit status {error.code}: {message or '(no message)'}"
    message = f"{type(error).__name__}: {error}"
    if isinstance(error, CLEAR_TYPES) or (isinstance(error, OSError) and str(error)):
        return True, message
    return False, message


def classify(probe: Probe, result: Any, problem: str | None, error: BaseException | None,
             stderr: str) -> tuple[str, str]:
    """The probe's verdict and what it is based on (see the module docstring); `problem` is
    what the probe's check found wrong with an accepted input's result."""
    if isinstance(error, HarnessError):
        return "harness", str(error)
    if isinstance(error, Hang):
        return "unclear", f"hang: no answer in {TIMEOUT} s"
    if error is None:
        if probe.expect == "refuse":
            last = str(result).strip().splitlines()[-1:] if isinstance(result, str) else []
            return "silent", "accepted without a word" + "".join(f" ({line[:160]})"
                                                                 for line in last)
        return ("silent", problem) if problem else ("ok", "")
    typed, message = _refusal(error, stderr)
    if probe.expect == "accept":
        return "unclear", f"refused a valid input: {message}"
    if typed and _named(message, probe.names):
        return "clear", message
    why = "names none of " + ", ".join(probe.names) if typed else "a raw exception"
    return "unclear", f"{why}: {message}"


def _checked(probe: Probe, ctx: Ctx, result: Any) -> str | None:
    """The probe's check of an accepted input's result; a check that cannot even read the
    result (a file the package wrote is unreadable) found it wrong."""
    try:
        return probe.check(ctx, result)
    except HarnessError:
        raise
    except Exception as err:
        return f"the check failed: {type(err).__name__}: {err}"


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


@contextlib.contextmanager
def _quiet_descriptors() -> Iterator[None]:
    """Send what native code writes to file descriptors 1 and 2 (the tokenizers' progress
    bars) to /dev/null; Python's own output is captured by redirect_stdout/stderr."""
    sys.__stdout__.flush()
    sys.__stderr__.flush()
    saved, null = (os.dup(1), os.dup(2)), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def run_probe(probe: Probe) -> tuple[str, str]:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="probe-", dir=SESSION))
    ctx, out, err = Ctx(tmp), io.StringIO(), io.StringIO()
    cwd, threads = os.getcwd(), torch.get_num_threads()
    result, problem, error = None, None, None
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT)
    try:
        os.chdir(tmp)
        with _quiet_descriptors(), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = probe.action(ctx)
            if probe.check is not None and probe.expect != "refuse":
                problem = _checked(probe, ctx, result)
    except KeyboardInterrupt:
        raise
    except BaseException as caught:  # noqa: B036 (SystemExit and Hang are outcomes too)
        error = caught
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(cwd)
        torch.set_num_threads(threads)
    verdict, message = classify(probe, result, problem, error, err.getvalue())
    lost = ctx.losses()
    if lost and verdict != "harness":
        verdict, message = "loss", f"{lost} ({verdict}: {message})" if message else lost
    shutil.rmtree(tmp, ignore_errors=True)
    return verdict, " ".join(message.split())


# ---------------------------------------------------------------------------------------- helpers
def need(condition: bool, what: str) -> None:
    if not condition:
        raise HarnessError(what)


def fixture(build: Callable[[], Any]) -> Callable[[], Any]:
    """A shared input, built once on first use; a failure is the harness's."""
    cached = functools.cache(build)

    @functools.wraps(build)
    def get() -> Any:
        try:
            return cached()
        except (Exception, SystemExit) as err:
            raise HarnessError(f"fixture {build.__name__}: {type(err).__name__}: {err}") from err
    return get


def train(*argv: object) -> str:
    """dsv3_lite.train's command line in this process; its standard output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train_main([str(a) for a in argv])
    return out.getvalue()


def chat(stdin: bytes, *argv: object) -> str:
    """dsv3_lite.chat's command line with `stdin` as its input, writing to a strict UTF-8
    stdout as a terminal would; its output. A non-zero status is raised as SystemExit."""
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
    saved, sys.stdin = sys.stdin, io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(stdout):
            status = chat_main([str(a) for a in argv])
    finally:
        sys.stdin = saved
    if status:
        raise SystemExit(status)
    return raw.getvalue().decode("utf-8")


def book_chat(stdin: bytes, *argv: object) -> str:
    return chat(stdin, "--book", "--max-new-tokens", 8, *argv)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))


def _popen(ctx: Ctx, module: str, argv: list[object], **kw: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *map(str, argv)], cwd=ctx.tmp,
                            start_new_session=True, preexec_fn=_limit_memory,
                            env=dict(os.environ, TQDM_DISABLE="1"), **kw)


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def subprocess_train(ctx: Ctx, *argv: object) -> str:
    """The training command line in a subprocess (memory limit 8 GiB): its standard output;
    exit status 2 becomes SystemExit(2) with its stderr, any other failure `Crashed`."""
    process = _popen(ctx, "dsv3_lite.train", list(argv), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=TIMEOUT - 5)
    except subprocess.TimeoutExpired:
        raise Hang() from None
    finally:
        _kill(process)
    if process.returncode == 0:
        return out
    sys.stderr.write(err)
    if process.returncode == 2:
        raise SystemExit(2)
    lines = [line for line in err.splitlines() if line.strip()]
    last = next((line for line in reversed(lines)
                 if re.search(r"Error\b|Exception\b|panicked|failed", line)),
                lines[-1] if lines else "")
    raise Crashed(f"exit status {process.returncode}: {last}")


def flip(path: pathlib.Path) -> None:
    """Flip one bit in the middle of a file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def rehash(folder: pathlib.Path) -> None:
    """Rewrite a checkpoint's manifest for its files as they are now (an edit that also
    updates the manifest, so that only the loader's own checks can catch it)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = {name: {"bytes": (folder / name).stat().st_size,
                                "sha256": sha256(folder / name)} for name in manifest["files"]}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def edit_json(path: pathlib.Path, edit: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def copy(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def notes(folder: pathlib.Path) -> pathlib.Path:
    """A user's folder with a file of their own in it."""
    folder.mkdir(parents=True)
    (folder / "todo.txt").write_text("keep me\n")
    return folder


def my_file(ctx: Ctx) -> pathlib.Path:
    """A user's file, my-notes.txt."""
    (ctx.tmp / "my-notes.txt").write_text("keep me\n")
    return ctx.tmp / "my-notes.txt"


def my_link(ctx: Ctx, target: pathlib.Path) -> pathlib.Path:
    """A symbolic link, link, to `target`."""
    (ctx.tmp / "link").symlink_to(target)
    return ctx.tmp / "link"


def writes(data: bytes) -> Callable[[pathlib.Path], Any]:
    return lambda path: path.write_bytes(data)


def same_weights(a: pathlib.Path, b: pathlib.Path) -> str | None:
    """None if two runs end on the same step with the same weights, config, tokenizer and
    losses, byte for byte; else what differs."""
    if not steps_of(a) or not steps_of(b):
        return f"no checkpoint in {a.name if not steps_of(a) else b.name}"
    x, y = steps_of(a)[-1], steps_of(b)[-1]
    if x.name != y.name:
        return f"ends at {x.name}, the reference at {y.name}"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        if (x / name).read_bytes() != (y / name).read_bytes():
            return f"{name} differs from the uninterrupted run's"
    losses = [json.loads((r / "history.json").read_text())["train_loss"] for r in (a, b)]
    return None if losses[0] == losses[1] else "the losses differ from the uninterrupted run's"


def finished(steps: int) -> Callable[[Ctx, Any], str | None]:
    """Check: the run in ctx.tmp/run ends with a sound checkpoint at `steps`."""
    def check(ctx: Ctx, result: Any) -> str | None:
        folders = steps_of(ctx.tmp / "run")
        if not folders or folders[-1].name != f"step-{steps:08d}":
            return f"the run ends at {folders[-1].name if folders else 'no checkpoint'}"
        verify_manifest(folders[-1])
        return None
    return check


# --------------------------------------------------------------------------------------- fixtures
@fixture
def base_run() -> pathlib.Path:
    """A run stopped at step 4 of 8 (one checkpoint, step-00000004)."""
    out = SESSION / "base-run"
    train("--out", out, *CLI, "--stop-at", 4)
    return out


@fixture
def whole_run() -> pathlib.Path:
    """An uninterrupted 8-step run with seed 1: what interrupted ones must reproduce."""
    out = SESSION / "whole-run"
    train("--out", out, "--seed", 1, *CLI)
    return out


@fixture
def text_run() -> tuple[pathlib.Path, pathlib.Path]:
    """A run on a --text file, stopped at step 1 of 2: (the run, the file)."""
    text = SESSION / "tide-notes.txt"
    text.write_text("\n\n".join(f"Note {i}: the tide was {'high' if i % 2 else 'low'} at {i}. "
                                "潮水。" for i in range(60)), encoding="utf-8")
    out = SESSION / "text-run"
    train("--out", out, "--text", text, *CLI[2:], "--steps", 2, "--stop-at", 1,
          "--fim_rate", 0.0)
    return out, text


@fixture
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train((d.text for d in build_documents(20)), vocab_size=300)


@fixture
def trained() -> tuple[Transformer, Trainer]:
    """A tiny model after two training steps, and its trainer."""
    shape = dict(dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_heads=2, q_lora_rank=16,
                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                 max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(ModelArgs.tiny(vocab_size=tokenizer().vocab_size, **shape))
    corpus = Corpus(build_documents(4), val_every=4, tokenizer=tokenizer(), fim_rate=0.1)
    trainer = Trainer(model, corpus, TrainArgs(steps=4, seq_len=32, batch_size=4,
                                               batch_size_start=4, warmup_steps=1,
                                               eval_batches=1), progress=False)
    trainer.train(until=2)
    return model, trainer


@fixture
def checkpoint() -> pathlib.Path:
    model, trainer = trained()
    return save_checkpoint(SESSION / "checkpoint", model, tokenizer(), trainer,
                           {"docs_per_domain": 4})


@fixture
def release_model() -> Transformer:
    """A tiny model with O(1) weights and one MTP module, for the released layout."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.tiny(mtp_depth=1, rope_factor=1.0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.3)
    return model


@fixture
def release() -> pathlib.Path:
    return save_release(release_model(), SESSION / "release", fp8=False)


@fixture
def release_fp8() -> pathlib.Path:
    return save_release(release_model(), SESSION / "release-fp8", fp8=True)


@fixture
def book_client() -> Client:
    return Client(BOOK_CHECKPOINT)


@fixture
def book_model() -> Transformer:
    """The book's model, apart from the client's, in eval mode."""
    return load_checkpoint(BOOK_CHECKPOINT).model.eval()


@fixture
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs.tiny()).eval()


# --------------------------------------------------------------------- 1. the training command line
def _option_names(option: str) -> tuple[str, ...]:
    """The names an error about `option` may use: the option and its field."""
    field = option.lstrip("-").replace("-", "_").removesuffix("_tokens")
    return option, field


def train_cli() -> list[Probe]:
    area, probes = "train-cli", []

    def new_run(*extra: object) -> Callable[[Ctx], str]:
        return lambda ctx: train("--out", ctx.tmp / "run", *CLI, *extra)

    # zero, negative, non-numeric and huge values (huge ones that are valid are below)
    bad = {
        "--steps": ["0", "-1", "abc"], "--lr": ["0", "nan", "abc", "1e30"],
        "--seq_len": ["0", "abc", "1000000"], "--batch_size": ["0", "abc"],
        "--save-every": ["-1", "abc"], "--keep": ["0", "abc"], "--threads": ["0", "abc"],
        "--stop-at": ["0", "-1", "abc", str(10**12)],
        "--seed": ["-1", "abc", str(2**63), str(2**64)],
        "--precision": ["fp16", "FP32"], "--device": ["tpu"], "--text-limit": ["0"],
        "--docs-per-domain": ["1"],
        # ModelArgs and TrainArgs fields
        "--dim": ["0", "1000000"], "--vocab_size": ["100"], "--n_activated_experts": ["9"],
        "--score_func": ["relu"], "--rms_norm_eps": ["nan"], "--max_seq_len": ["16"],
        "--batch_size_start": ["8"], "--fim_rate": ["2"], "--warmup_steps": ["-1"],
        # schedule breakpoints in tokens
        "--decay_start_tokens": ["-1", "5X", "1.5", "inf"], "--mtp_switch_tokens": ["1T"],
    }
    for option, values in bad.items():
        for value in values:
            probes.append(Probe(area, f"{option} {value!r}", new_run(f"{option}={value}"),
                                names=_option_names(option)))
    if not torch.cuda.is_available():
        probes.append(Probe(area, "--device cuda without CUDA", new_run("--device", "cuda"),
                            names=("--device",)))
    probes += [
        Probe(area, "--decay_start_tokens 0.9 --decay_end_tokens 0.5",
              new_run("--decay_start_tokens", 0.9, "--decay_end_tokens", 0.5),
              names=("--decay_start_tokens", "--decay_end_tokens", "decay_start", "decay_end")),
        Probe(area, "--decay_start_tokens with --decay_start",
              new_run("--decay_start_tokens", 0.5, "--decay_start", 0.3),
              names=("--decay_start_tokens", "--decay_start")),
    ]
    # values that would exhaust this process's threads or memory: in a subprocess
    for extra in (("--threads", 10**6), ("--batch_size", 10**9), ("--vocab_size", 10**9)):
        probes.append(Probe(area, f"{extra[0]} {extra[1]} (subprocess)",
                            lambda ctx, e=extra: subprocess_train(
                                ctx, "--out", ctx.tmp / "run", *CLI, *e),
                            names=_option_names(extra[0])))

    def decay_start_of(tokens: int) -> Callable[[Ctx, Any], str | None]:
        def check(ctx: Ctx, result: Any) -> str | None:
            saved = json.loads((steps_of(ctx.tmp / "run")[-1] / "config.json").read_text())["train"]
            given = TrainArgs(**{**saved, "decay_start": TrainArgs.decay_start})
            wanted = given.in_tokens(decay_start=tokens).decay_start
            return None if saved["decay_start"] == wanted else \
                f"decay_start {saved['decay_start']}, in_tokens gives {wanted}"
        return check

    def vocab_matches(ctx: Ctx, result: Any) -> str | None:
        saved = load_checkpoint(ctx.tmp / "run")
        return None if saved.model.args.vocab_size == saved.tokenizer.vocab_size else \
            "vocab_size differs from the tokenizer's"

    def kept_one(ctx: Ctx, result: Any) -> str | None:
        names = [p.name for p in steps_of(ctx.tmp / "run")]
        return None if names == ["step-00000008"] else f"step folders {names}"

    def stopped_at_one(ctx: Ctx, result: Any) -> str | None:
        saved = load_checkpoint(ctx.tmp / "run")
        return None if (saved.trainer_state["step"], saved.train_args.steps) == (1, 10**12) else \
            f"step {saved.trainer_state['step']} of {saved.train_args.steps}"

    for extra, check in [(("--steps", 10**12, "--stop-at", 1), stopped_at_one),
                         (("--save-every", 10**12), finished(8)),
                         (("--keep", 10**12), finished(8)),
                         (("--save-every", 1, "--keep", 1), kept_one),
                         (("--threads", 1), finished(8)), (("--precision", "bf16"), finished(8)),
                         (("--precision", "fp8"), finished(8)),
                         (("--decay_start_tokens", 2), decay_start_of(2)),
                         (("--vocab_size", 100_000), vocab_matches)]:
        probes.append(Probe(area, " ".join(map(str, extra)) + " (valid)", new_run(*extra),
                            "accept", check=check))

    # --text
    texts = {"empty.txt": b"", "nul.txt": b"\0" * 1000, "few.txt": b"one\n\ntwo\n\nthree\n",
             "spaces.txt": b"  \n\n\t\n\n   \n",
             "latin1.txt": "café olé\n\n".encode("latin-1") * 20,
             "bad-utf8.txt": b"ok\n\n" * 20 + b"\xff\xfe\n\n" + b"ok\n\n" * 5}

    def text_run_of(name: str, make: Callable[[pathlib.Path], Any] | None,
                    *extra: object) -> Callable[[Ctx], str]:
        """A run on --text ctx.tmp/name, made first by make(path) (None: it does not exist)."""
        def action(ctx: Ctx) -> str:
            if make is not None:
                make(ctx.tmp / name)
            return train("--out", ctx.tmp / "run", "--text", ctx.tmp / name, *CLI[2:], *extra)
        return action

    for name, data in texts.items():
        probes.append(Probe(area, f"--text {name}", text_run_of(name, writes(data)),
                            names=(name, "--text")))
    short = "\n\n".join(f"note {i}" for i in range(30)).encode()
    probes += [
        Probe(area, "--text missing.txt", text_run_of("missing.txt", None),
              names=("missing.txt", "--text")),
        Probe(area, "--text a directory", text_run_of("folder", pathlib.Path.mkdir),
              names=("folder", "--text")),
        Probe(area, "--text /dev/zero", lambda ctx: train("--out", ctx.tmp / "run", "--text",
                                                          "/dev/zero", *CLI[2:]),
              names=("/dev/zero", "--text")),
        Probe(area, "--text a named pipe", text_run_of("pipe", os.mkfifo),
              names=("pipe", "--text")),
        Probe(area, "--text whose val split is shorter than seq_len",
              text_run_of("short.txt", writes(short)), names=("seq_len", "--seq_len")),
        Probe(area, "--text over --text-limit",
              text_run_of("big.txt", writes(b"word " * 300_000), "--text-limit", 1),
              names=("big.txt", "--text-limit")),
        Probe(area, "--text UTF-8 with BOM and CRLF (valid)",
              text_run_of("bom.txt", writes(b"\xef\xbb\xbf" + b"\r\n\r\n".join(
                  f"Line {i}: caf\xc3\xa9 \xe6\xbd\xae".encode() for i in range(40))),
                  "--steps", 2),
              "accept", check=finished(2)),
    ]

    # --out
    def out_is(make: Callable[[Ctx], pathlib.Path], *extra: object) -> Callable[[Ctx], str]:
        def action(ctx: Ctx) -> str:
            out = make(ctx)
            ctx.keep(*{out, out.resolve()} - {ctx.tmp / "nowhere"})
            return train("--out", out, *CLI, *extra)
        return action

    def under_a_file(ctx: Ctx) -> pathlib.Path:
        ctx.keep(my_file(ctx))
        return ctx.tmp / "my-notes.txt" / "run"

    probes += [
        Probe(area, "--out an existing file", out_is(my_file), names=("--out", "my-notes.txt")),
        Probe(area, "--out under a file", lambda ctx: train("--out", under_a_file(ctx), *CLI),
              names=("--out",)),
        Probe(area, "--out a foreign non-empty folder",
              out_is(lambda ctx: notes(ctx.tmp / "my-notes")), names=("--out", "my-notes")),
        Probe(area, "--out a link to a foreign folder",
              out_is(lambda ctx: my_link(ctx, notes(ctx.tmp / "my-notes"))),
              names=("--out", "link")),
        Probe(area, "--out a dangling link",
              out_is(lambda ctx: my_link(ctx, ctx.tmp / "nowhere")), names=("--out", "link")),
        Probe(area, "--out an existing run without --resume",
              out_is(lambda ctx: copy(base_run(), ctx.tmp / "old-run")),
              names=("--out", "old-run", "--resume")),
        Probe(area, "--out ''", lambda ctx: train("--out", "", *CLI), names=("--out",)),
        Probe(area, "--out an existing run with --overwrite (valid)",
              lambda ctx: train("--out", copy(base_run(), ctx.tmp / "run"), *CLI, "--overwrite"),
              "accept", check=finished(8)),
        Probe(area, "--resume a missing --out",
              lambda ctx: train("--out", ctx.tmp / "nowhere", "--resume"),
              names=("nowhere", "--out")),
        Probe(area, "--resume a foreign non-empty folder",
              out_is(lambda ctx: notes(ctx.tmp / "my-notes"), "--resume"),
              names=("my-notes", "--out")),
        Probe(area, "--resume a file", out_is(my_file, "--resume"),
              names=("my-notes.txt", "--out")),
    ]

    # --export and --export-only: the target may hold data that must survive
    def export_to(make: Callable[[Ctx], pathlib.Path], only: bool = False
                  ) -> Callable[[Ctx], str]:
        def action(ctx: Ctx) -> str:
            target = make(ctx)
            ctx.keep(*{target, target.resolve()})
            if only:
                return train("--out", copy(base_run(), ctx.tmp / "run"), "--export-only", target)
            return train("--out", ctx.tmp / "run", *CLI, "--export", target)
        return action

    targets = {"a run folder": (lambda ctx: copy(base_run(), ctx.tmp / "old-run"), "old-run"),
               "a foreign non-empty folder": (lambda ctx: notes(ctx.tmp / "my-notes"), "my-notes"),
               "a link to a foreign folder":
                   (lambda ctx: my_link(ctx, notes(ctx.tmp / "my-notes")), "link"),
               "an existing file": (my_file, "my-notes.txt")}
    for what, (make, name) in targets.items():
        probes.append(Probe(area, f"--export into {what}", export_to(make),
                            names=("--export", name)))
        if what in ("a run folder", "a link to a foreign folder"):
            probes.append(Probe(area, f"--export-only into {what}", export_to(make, only=True),
                                names=("--export-only", name)))

    def exported(ctx: Ctx, result: Any) -> str | None:
        release, run = load_checkpoint(ctx.tmp / "release"), ctx.tmp / "run"
        weights = (steps_of(run)[-1] / "model.safetensors").read_bytes()
        if release.trainer_state is not None:
            return "the release holds a trainer state"
        return None if (ctx.tmp / "release" / "model.safetensors").read_bytes() == weights \
            else "the release's weights are not the run's"

    def export_over_release(ctx: Ctx) -> str:
        run = copy(base_run(), ctx.tmp / "run")
        train("--out", run, "--export-only", ctx.tmp / "release")
        return train("--out", run, "--resume", "--export", ctx.tmp / "release")

    probes += [
        Probe(area, "--export the same folder as --out",
              lambda ctx: train("--out", ctx.tmp / "run", *CLI, "--export", ctx.tmp / "run"),
              names=("--export", "--out")),
        Probe(area, "--export-only with training options",
              lambda ctx: train("--out", copy(base_run(), ctx.tmp / "run"), "--export-only",
                                ctx.tmp / "release", "--lr", 0.1),
              names=("--export-only", "--lr")),
        Probe(area, "--export-only of a folder without a run",
              lambda ctx: train("--out", notes(ctx.tmp / "my-notes"), "--export-only",
                                ctx.tmp / "release"),
              names=("my-notes",)),
        Probe(area, "--export-only into a new folder (valid)",
              lambda ctx: train("--out", copy(base_run(), ctx.tmp / "run"), "--export-only",
                                ctx.tmp / "release"), "accept", check=exported),
        Probe(area, "--export over an earlier release (valid)", export_over_release, "accept",
              check=exported),
    ]
    return probes


# -------------------------------------------------------------------------------------- 2. resume
def resume() -> list[Probe]:
    area, probes = "resume", []

    def resumed(*extra: object, damage: Callable[[pathlib.Path], None] | None = None,
                refused: bool = True) -> Callable[[Ctx], str]:
        """Resume a copy of the base run (damaged first by damage(its step folder)); a
        refused resume must leave the copy as it was."""
        def action(ctx: Ctx) -> str:
            run = copy(base_run(), ctx.tmp / "run")
            if damage is not None:
                damage(steps_of(run)[-1])
            if refused:
                ctx.keep(run)
            return train("--out", run, "--resume", *extra)
        return action

    changed = [("--route_scale", 2.0), ("--score_func", "softmax"), ("--n_activated_experts", 1),
               ("--rms_norm_eps", 1e-5), ("--seed", 5), ("--lr", 0.1),
               ("--docs-per-domain", 9), ("--preset", "small"),
               ("--steps", 3), ("--steps", 4), ("--stop-at", 4), ("--decay_start_tokens", 0.5)]
    for option, value in changed:
        probes.append(Probe(area, f"{option} {value}", resumed(option, value),
                            names=_option_names(option)))

    def swap_tokenizer(folder: pathlib.Path) -> None:
        other = BPETokenizer.train((d.text for d in build_documents(20, seed=7)), vocab_size=300)
        need(other.vocab_size == tokenizer().vocab_size == 300, "tokenizers of unequal size")
        other.save(folder / "tokenizer.json")

    def edit_state(edit: Callable[[dict], Any]) -> Callable[[pathlib.Path], None]:
        def damage(folder: pathlib.Path) -> None:
            state = torch.load(folder / "trainer_state.pt", weights_only=True)
            edit(state)
            torch.save(state, folder / "trainer_state.pt")
        return damage

    def and_rehash(damage: Callable[[pathlib.Path], None]) -> Callable[[pathlib.Path], None]:
        return lambda folder: (damage(folder), rehash(folder))

    damaged = {
        "flipped byte in model.safetensors": (lambda f: flip(f / "model.safetensors"),
                                              "model.safetensors"),
        "flipped byte in trainer_state.pt": (lambda f: flip(f / "trainer_state.pt"),
                                             "trainer_state.pt"),
        "deleted tokenizer.json": (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json"),
        "edited config.json (dim)": (lambda f: edit_json(f / "config.json", lambda c: {
            **c, "model": {**c["model"], "dim": 64}}), "config.json"),
        "swapped tokenizer of the same size": (swap_tokenizer, "tokenizer.json"),
        "corrupt manifest.json": (lambda f: (f / MANIFEST).write_text("{"), MANIFEST),
        "position -5": (edit_state(lambda s: s.update(position=-5)), "trainer_state.pt"),
        "position 10**12": (edit_state(lambda s: s.update(position=10**12)), "trainer_state.pt"),
        "position -5, manifest re-hashed":
            (and_rehash(edit_state(lambda s: s.update(position=-5))), "trainer_state.pt"),
        "position 10**12, manifest re-hashed":
            (and_rehash(edit_state(lambda s: s.update(position=10**12))), "trainer_state.pt"),
        "step 100, manifest re-hashed":
            (and_rehash(edit_state(lambda s: s.update(step=100))), "trainer_state.pt"),
        "RNG state garbage, manifest re-hashed": (and_rehash(edit_state(
            lambda s: s["rng"].update(torch=torch.zeros(7, dtype=torch.uint8)))),
            "trainer_state.pt"),
        "history garbage, manifest re-hashed":
            (and_rehash(edit_state(lambda s: s.update(history={"bogus": 1}))), "trainer_state.pt"),
    }
    for what, (damage, name) in damaged.items():
        probes.append(Probe(area, what, resumed(damage=damage), names=(name,)))

    def text_resumed(change: Callable[[pathlib.Path], None]) -> Callable[[Ctx], str]:
        def action(ctx: Ctx) -> str:
            run, text = text_run()
            run = copy(run, ctx.tmp / "run")
            original = text.read_bytes()
            try:
                change(text)
                ctx.keep(run)
                return train("--out", run, "--resume")
            finally:
                text.write_bytes(original)
        return action

    def other_text(ctx: Ctx) -> str:
        (ctx.tmp / "other.txt").write_text("x\n\n" * 20)
        return resumed("--text", ctx.tmp / "other.txt")(ctx)

    def leftover_only(ctx: Ctx) -> str:
        (ctx.tmp / "my-run" / ".step-00000001.tmp-12345").mkdir(parents=True)
        ctx.keep(ctx.tmp / "my-run")
        return train("--out", ctx.tmp / "my-run", "--resume")

    probes += [
        Probe(area, "--text file changed since the run started",
              text_resumed(lambda t: t.write_bytes(t.read_bytes().replace(b"tide", b"Tide"))),
              names=("tide-notes.txt",)),
        Probe(area, "--text file deleted", text_resumed(lambda t: t.unlink()),
              names=("tide-notes.txt",)),
        Probe(area, "--text of another file on a book-corpus run", other_text,
              names=("--text",)),
        Probe(area, "a run stopped before its first save", leftover_only, names=("my-run",)),
    ]

    # valid resumes: the result must be what an uninterrupted run gives
    def split_run(ctx: Ctx) -> pathlib.Path:
        train("--out", ctx.tmp / "run", "--seed", 1, *CLI, "--stop-at", 3)
        train("--out", ctx.tmp / "run", "--resume")
        return ctx.tmp / "run"

    def equals_whole(ctx: Ctx, result: Any) -> str | None:
        return same_weights(ctx.tmp / "run", whole_run())

    def extended(ctx: Ctx, result: Any) -> str | None:
        lr = json.loads((ctx.tmp / "run" / "history.json").read_text())["lr"]
        return finished(10)(ctx, result) or (None if len(lr) == 10 else f"{len(lr)} steps")

    def older_sound(ctx: Ctx) -> str:
        run = copy(base_run(), ctx.tmp / "run")
        train("--out", run, "--resume", "--stop-at", 6)
        need([p.name for p in steps_of(run)] == ["step-00000004", "step-00000006"],
             "no checkpoints at steps 4 and 6")
        flip(run / "step-00000006" / "model.safetensors")
        return train("--out", run, "--resume")

    def skipped_and_finished(ctx: Ctx, result: str) -> str | None:
        if "step-00000006 skipped" not in result or "from step-00000004" not in result:
            return "did not say that it skipped step-00000006 and resumed from step-00000004"
        return finished(8)(ctx, result)

    probes += [
        Probe(area, "after --stop-at 3: bit for bit the uninterrupted run", split_run, "accept",
              check=equals_whole),
        Probe(area, "--steps 10 extends the run", resumed("--steps", 10, refused=False),
              "accept", check=extended),
        Probe(area, "--lr given with its saved value", resumed("--lr", 0.003, refused=False),
              "accept", check=finished(8)),
        Probe(area, "newest checkpoint damaged: the older one is taken", older_sound, "accept",
              check=skipped_and_finished),
        Probe(area, "kill -9 during saves, then --resume: bit for bit", killed_then_resumed,
              "accept", check=equals_whole),
    ]
    return probes


def killed_then_resumed(ctx: Ctx) -> pathlib.Path:
    """SIGKILL the command line (a subprocess) while it saves step 5, then resume it here."""
    out = ctx.tmp / "run"
    threads = torch.get_num_threads()  # the same arithmetic as this process's runs
    process = _popen(ctx, "dsv3_lite.train", ["--out", out, "--seed", 1, *CLI, "--save-every", 1,
                                              "--threads", threads],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saving = re.compile(r"\.?step-00000005(\.tmp-\d+)?")
    try:
        while process.poll() is None:
            if out.is_dir() and any(saving.fullmatch(name) for name in os.listdir(out)):
                break
            time.sleep(0.0005)
        time.sleep(0.002)
        need(process.poll() is None, "the run ended before it could be killed")
    finally:
        _kill(process)
    train("--out", out, "--resume", "--threads", threads)
    return out


# --------------------------------------------------------------------------------- 3. checkpoints
def checkpoints() -> list[Probe]:
    area, probes = "checkpoint", []

    def save_into(make: Callable[[Ctx], pathlib.Path]) -> Callable[[Ctx], Any]:
        def action(ctx: Ctx) -> Any:
            target = make(ctx)
            ctx.keep(target)
            model, trainer = trained()
            return save_checkpoint(target, model, tokenizer(), trainer)
        return action

    probes += [
        Probe(area, "save_checkpoint into a non-empty folder",
              save_into(lambda ctx: notes(ctx.tmp / "my-notes")), names=("my-notes",)),
        Probe(area, "save_checkpoint onto a file", save_into(my_file), names=("my-notes.txt",)),
    ]
    for keep in (0, -1, 1.5):
        probes.append(Probe(area, f"save_step keep={keep}",
                            lambda ctx, k=keep: save_step(ctx.tmp / "run", trained()[0],
                                                          tokenizer(), trained()[1], keep=k),
                            names=("keep",)))

    def loaded(damage: Callable[[pathlib.Path], None], verify: bool = True,
               device: str = "cpu") -> Callable[[Ctx], Any]:
        def action(ctx: Ctx) -> Any:
            folder = copy(checkpoint(), ctx.tmp / "ckpt")
            damage(folder)
            return load_checkpoint(folder, device=device, verify=verify)
        return action

    def config_edit(edit: Callable[[dict], Any]) -> Callable[[pathlib.Path], None]:
        return lambda folder: edit_json(folder / "config.json", edit)

    def replace_by_link(name: str) -> Callable[[pathlib.Path], None]:
        def damage(folder: pathlib.Path) -> None:
            (folder / name).unlink()
            (folder / name).symlink_to(checkpoint() / name)
        return damage

    def replace_by_folder(name: str) -> Callable[[pathlib.Path], None]:
        return lambda folder: ((folder / name).unlink(), (folder / name).mkdir())

    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt"):
        probes.append(Probe(area, f"load: truncated {name}, verify=False",
                            loaded(lambda f, n=name: truncate(f / n), verify=False),
                            names=(name,)))
    for name in ("model.safetensors", "trainer_state.pt"):
        probes.append(Probe(area, f"load: flipped byte in {name}",
                            loaded(lambda f, n=name: flip(f / n)), names=(name,)))
    probes += [
        Probe(area, "load: truncated model.safetensors",
              loaded(lambda f: truncate(f / "model.safetensors")), names=("model.safetensors",)),
        Probe(area, "load: model.safetensors is a link",
              loaded(replace_by_link("model.safetensors")), names=("model.safetensors",)),
        Probe(area, "load: model.safetensors is a folder",
              loaded(replace_by_folder("model.safetensors")), names=("model.safetensors",)),
    ]
    model_field = config_edit(lambda c: {**c, "model": {k: v for k, v in c["model"].items()
                                                        if k != "dim"}})
    for what, damage, verify, names in [
            ("edited config.json (dim)", config_edit(lambda c: {**c, "model": {
                **c["model"], "dim": 64}}), True, ("config.json",)),
            ("edited config.json (dim), verify=False", config_edit(lambda c: {**c, "model": {
                **c["model"], "dim": 64}}), False, ("config.json", "model.safetensors")),
            ("config.json without the dim field, verify=False", model_field, False,
             ("config.json", "dim")),
            ("config.json a JSON list, verify=False", config_edit(lambda c: [c]), False,
             ("config.json",)),
            ("config.json dim '32', verify=False", config_edit(lambda c: {**c, "model": {
                **c["model"], "dim": "32"}}), False, ("config.json",)),
            ("config.json with an unknown field, verify=False", config_edit(lambda c: {
                **c, "model": {**c["model"], "dimm": 32}}), False, ("config.json", "dimm")),
            ("corrupt manifest.json", lambda f: (f / MANIFEST).write_text("[1, 2"), True,
             (MANIFEST,)),
            ("manifest.json lacks tokenizer.json", lambda f: edit_json(f / MANIFEST, lambda m: {
                "files": {k: v for k, v in m["files"].items() if k != "tokenizer.json"}}), True,
             ("tokenizer.json",)),
            ("manifest.json lists an absent file", lambda f: edit_json(f / MANIFEST, lambda m: {
                "files": {**m["files"], "extra.bin": {"bytes": 1, "sha256": "0"}}}), True,
             ("extra.bin",))]:
        probes.append(Probe(area, f"load: {what}", loaded(damage, verify), names=names))
    probes += [
        Probe(area, "load: a missing folder",
              lambda ctx: load_checkpoint(ctx.tmp / "nowhere"), names=("nowhere",)),
        Probe(area, "load: a file", lambda ctx: load_checkpoint(my_file(ctx)),
              names=("my-notes.txt",)),
        Probe(area, "load: device='bogus'", loaded(lambda f: None, device="bogus"),
              names=("bogus", "device")),
    ]
    if not torch.cuda.is_available():
        probes.append(Probe(area, "load: device='cuda' without CUDA",
                            loaded(lambda f: None, device="cuda"), names=("cuda", "device")))

    def run_folder(ctx: Ctx, steps: tuple[int, ...]) -> pathlib.Path:
        model, trainer = trained()
        for step in steps:
            trainer.step = step
            save_step(ctx.tmp / "run", model, tokenizer(), trainer, keep=len(steps))
        trainer.step = 2
        flushed(ctx.tmp / "run")
        return ctx.tmp / "run"

    def only_step_broken(ctx: Ctx) -> Any:
        run = run_folder(ctx, (3,))
        flip(run / "step-00000003" / "model.safetensors")
        return load_checkpoint(run)

    def newest_broken(ctx: Ctx) -> Any:
        run = run_folder(ctx, (3, 4))
        flip(run / "step-00000004" / "model.safetensors")
        return load_checkpoint(run)

    def older_taken(ctx: Ctx, result: Any) -> str | None:
        if result.path.name != "step-00000003" or len(result.skipped) != 1:
            return f"loaded {result.path.name}, skipped {result.skipped}"
        return None

    def newest_kept(ctx: Ctx, result: Any) -> str | None:
        names = [p.name for p in steps_of(ctx.tmp / "run")]
        return None if names == ["step-00000005"] else f"step folders {names}"

    def keep_one(ctx: Ctx) -> Any:
        model, trainer = trained()
        for step in (3, 4, 5):
            trainer.step = step
            save_step(ctx.tmp / "run", model, tokenizer(), trainer, keep=1)
        trainer.step = 2
        flushed(ctx.tmp / "run")  # older step folders go once the newest is on the disk

    probes += [
        Probe(area, "load: a run whose only checkpoint is damaged", only_step_broken,
              names=("model.safetensors",)),
        Probe(area, "load: a run whose newest checkpoint is damaged (valid)", newest_broken,
              "accept", check=older_taken),
        Probe(area, "save_step keep=1 (valid)", keep_one, "accept", check=newest_kept),
        Probe(area, "verify_manifest of a folder without one",
              lambda ctx: verify_manifest(notes(ctx.tmp / "my-notes")), names=(MANIFEST,)),
    ]

    # export: never into data it does not own, never through a link
    def export_into(make: Callable[[Ctx], pathlib.Path]) -> Callable[[Ctx], Any]:
        def action(ctx: Ctx) -> Any:
            target = make(ctx)
            ctx.keep(*{target, target.resolve()})
            return export(checkpoint(), target)
        return action

    def with_link(name: str, target: str) -> Callable[[Ctx], Any]:
        def action(ctx: Ctx) -> Any:
            source = copy(checkpoint(), ctx.tmp / "source")
            (source / MANIFEST).unlink()
            if (source / name).exists():
                (source / name).unlink()
            (source / name).symlink_to(target)
            return export(source, ctx.tmp / "release")
        return action

    def no_passwd(ctx: Ctx, result: Any) -> str | None:
        copied = [p.name for p in (ctx.tmp / "release").iterdir()
                  if p.is_file() and p.read_bytes() == pathlib.Path("/etc/passwd").read_bytes()]
        return f"/etc/passwd copied as {copied}" if copied else None

    def release_loads(ctx: Ctx, result: Any) -> str | None:
        return None if load_checkpoint(result).trainer_state is None else "holds a trainer state"

    def over_release(ctx: Ctx) -> Any:
        export(checkpoint(), ctx.tmp / "release")
        return export(checkpoint(), ctx.tmp / "release")

    probes += [
        Probe(area, "export into a run folder",
              export_into(lambda ctx: copy(base_run(), ctx.tmp / "old-run")), names=("old-run",)),
        Probe(area, "export into a foreign non-empty folder",
              export_into(lambda ctx: notes(ctx.tmp / "my-notes")), names=("my-notes",)),
        Probe(area, "export onto a file", export_into(my_file), names=("my-notes.txt",)),
        Probe(area, "export into a link to a foreign folder",
              export_into(lambda ctx: my_link(ctx, notes(ctx.tmp / "my-notes"))),
              names=("link",)),
        Probe(area, "export into its own source", lambda ctx: export(
            copy(checkpoint(), ctx.tmp / "ckpt"), ctx.tmp / "ckpt"), names=("ckpt",)),
        Probe(area, "export of a folder with a link to /etc/passwd",
              with_link("notes.txt", "/etc/passwd"), "either", names=("notes.txt",),
              check=no_passwd),
        Probe(area, "export of a folder whose weights are a link",
              lambda ctx: with_link("model.safetensors",
                                    str(checkpoint() / "model.safetensors"))(ctx),
              names=("model.safetensors",)),
        Probe(area, "export into a new folder (valid)",
              lambda ctx: export(checkpoint(), ctx.tmp / "release"), "accept",
              check=release_loads),
        Probe(area, "export over an earlier release (valid)", over_release, "accept",
              check=release_loads),
    ]
    return probes


# ----------------------------------------------------------------------- 3b. the released layout
INDEX = "model.safetensors.index.json"
SHARD = "model-00001-of-00001.safetensors"


def releases() -> list[Probe]:
    area, probes = "release", []

    def loaded(damage: Callable[[pathlib.Path], None], fp8: bool = False,
               **overrides: Any) -> Callable[[Ctx], Any]:
        def action(ctx: Ctx) -> Any:
            folder = copy(release_fp8() if fp8 else release(), ctx.tmp / "rel")
            damage(folder)
            return load_release(folder, **overrides)
        return action

    def index_to(entry: Callable[[Ctx], str]) -> Callable[[Ctx], Any]:
        """Every index entry names `entry`; a loadable copy of the shard lies there, so only
        the rule can refuse it."""
        def action(ctx: Ctx) -> Any:
            folder = copy(release(), ctx.tmp / "rel")
            (ctx.tmp / "outside").mkdir()
            (folder / "sub").mkdir()
            for place in (ctx.tmp / "x.safetensors", ctx.tmp / "outside" / "x.safetensors",
                          folder / "sub" / SHARD):
                shutil.copy(folder / SHARD, place)
            edit_json(folder / INDEX, lambda i: {**i, "weight_map": dict.fromkeys(
                i["weight_map"], entry(ctx))})
            return load_release(folder)
        return action

    for entry in ("../x.safetensors", "..", f"sub/{SHARD}", "x.safetensors"):
        probes.append(Probe(area, f"index entry {entry!r}", index_to(lambda ctx, e=entry: e),
                            names=(repr(entry),)))
    probes.append(Probe(area, "index entry an absolute path",
                        index_to(lambda ctx: str(ctx.tmp / "outside" / "x.safetensors")),
                        names=("x.safetensors",)))

    def shard_link(folder: pathlib.Path) -> None:
        outside = folder.parent / "stolen.safetensors"
        shutil.copy(folder / SHARD, outside)
        (folder / SHARD).unlink()
        (folder / SHARD).symlink_to(outside)

    def scale(value: float) -> Callable[[pathlib.Path], None]:
        def damage(folder: pathlib.Path) -> None:
            tensors = load_file(folder / SHARD)
            name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
            tensors[name] = torch.full_like(tensors[name], value)
            save_file(tensors, folder / SHARD, metadata={"format": "pt"})
        return damage

    weight = "model.layers.1.mlp.experts.3.up_proj.weight"
    config_fields = {
        "config.json without hidden_size": (lambda c: {k: v for k, v in c.items()
                                                       if k != "hidden_size"}, "hidden_size"),
        "config.json hidden_size '64'": (lambda c: {**c, "hidden_size": "64"}, "hidden_size"),
        "config.json hidden_size 128": (lambda c: {**c, "hidden_size": 128}, "hidden_size"),
        "config.json num_hidden_layers 0": (lambda c: {**c, "num_hidden_layers": 0},
                                            "num_hidden_layers"),
        "config.json scoring_func softmax": (lambda c: {**c, "scoring_func": "softmax"},
                                             "scoring_func"),
        "config.json a JSON list": (lambda c: [c], "config.json"),
    }
    for what, (edit, name) in config_fields.items():
        probes.append(Probe(area, what, loaded(lambda f, e=edit: edit_json(f / "config.json", e)),
                            names=(name,)))
    damaged = {
        "a shard that is a link outside the folder": (shard_link, SHARD),
        "a missing shard": (lambda f: (f / SHARD).unlink(), SHARD),
        "a truncated shard": (lambda f: truncate(f / SHARD), SHARD),
        "broken index JSON": (lambda f: (f / INDEX).write_text('{"weight_map": {'), INDEX),
        "weight_map a list": (lambda f: (f / INDEX).write_text(f'{{"weight_map": ["{SHARD}"]}}'),
                              "weight_map"),
        "index without a weight": (lambda f: edit_json(f / INDEX, lambda i: {
            **i, "weight_map": {k: v for k, v in i["weight_map"].items()
                                if not k.startswith("model.layers.1.")}}), INDEX),
        "index naming a weight the shard lacks": (lambda f: edit_json(f / INDEX, lambda i: {
            **i, "weight_map": {**i["weight_map"], "model.extra.weight": SHARD}}),
            "model.extra.weight"),
        "config.json not JSON": (lambda f: (f / "config.json").write_text("{hidden_size: 64"),
                                 "config.json"),
        "config.json missing": (lambda f: (f / "config.json").unlink(), "config.json"),
    }
    for what, (damage, name) in damaged.items():
        probes.append(Probe(area, what, loaded(damage), names=(name,)))
    fp8_damaged = {
        "FP8 weight without its scale": (lambda f: edit_json(f / INDEX, lambda i: {
            **i, "weight_map": {k: v for k, v in i["weight_map"].items()
                                if k != weight + "_scale_inv"}}), weight),
        "FP8 scale NaN": (scale(math.nan), "weight_scale_inv"),
        "FP8 scale 0": (scale(0.0), "weight_scale_inv"),
    }
    for what, (damage, name) in fp8_damaged.items():
        probes.append(Probe(area, what, loaded(damage, fp8=True), names=(name,)))
    for overrides, name in (({"n_layers": 2}, "n_layers"), ({"bogus": 1}, "bogus")):
        probes.append(Probe(area, f"load_release override {overrides}",
                            loaded(lambda f: None, **overrides), names=(name,)))
    probes.append(Probe(area, "load_release of a missing folder",
                        lambda ctx: load_release(ctx.tmp / "nowhere"), names=("nowhere",)))

    # save_release
    def save_into(make: Callable[[Ctx], pathlib.Path], **kw: Any) -> Callable[[Ctx], Any]:
        def action(ctx: Ctx) -> Any:
            target = make(ctx)
            ctx.keep(target)
            return save_release(release_model(), target, **kw)
        return action

    def own_config(ctx: Ctx) -> pathlib.Path:
        folder = notes(ctx.tmp / "my-model")
        (folder / "config.json").write_text('{"note": "my own settings"}\n')
        return folder

    for value in (0, "5"):
        probes.append(Probe(area, f"save_release shard_bytes={value!r}",
                            lambda ctx, v=value: save_release(release_model(), ctx.tmp / "rel",
                                                              shard_bytes=v),
                            names=("shard_bytes",)))
    probes += [
        Probe(area, "save_release onto a file", save_into(my_file), names=("my-notes.txt",)),
        Probe(area, "save_release into a dsv3_lite checkpoint folder",
              save_into(lambda ctx: copy(checkpoint(), ctx.tmp / "ckpt")), names=("ckpt",)),
        Probe(area, "save_release into a folder with its own config.json", save_into(own_config),
              names=("my-model", "config.json")),
    ]

    def resaved(ctx: Ctx) -> Transformer:
        folder = copy(release(), ctx.tmp / "rel")
        save_release(release_model(), folder, fp8=False, shard_bytes=100_000)  # many shards
        torch.manual_seed(1)
        model = Transformer(release_model().args.replace(mtp_depth=2)).eval()
        save_release(model, folder, fp8=False)
        return model

    def same_model(ctx: Ctx, model: Transformer) -> str | None:
        back = load_release(ctx.tmp / "rel")
        tokens = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            if back.args.mtp_depth != 2 or not torch.equal(back(tokens), model(tokens)):
                return "the loaded model is not the one saved"
        shards = sorted(p.name for p in (ctx.tmp / "rel").glob("model-*.safetensors"))
        return None if shards == [SHARD] else f"stale shards left: {shards}"

    probes += [
        Probe(area, "save_release over a release, fp8=False, mtp_depth 2 (valid)", resaved,
              "accept", check=same_model),
        Probe(area, "from_hf('a string')", lambda ctx: from_hf(str(release())),
              names=("hf_model",)),
        Probe(area, "from_hf(None)", lambda ctx: from_hf(None), names=("hf_model",)),
        Probe(area, "from_hf(a Linear)", lambda ctx: from_hf(torch.nn.Linear(2, 2)),
              names=("hf_model",)),
    ]
    return probes


# ------------------------------------------------------------------------- 4. generation and client
QUESTIONS = ["What is 35 * 9?", "What is 7 * 8?", "What is 1234 + 56?", "你好，今天去哪里？"]


def generation() -> list[Probe]:
    area, probes = "generate", []

    def ask(method: str, text: Any = "What is 7 * 8?", **options: Any) -> Callable[[Ctx], Any]:
        def action(ctx: Ctx) -> Any:
            client = book_client()
            if method == "stream":
                return "".join(client.stream(text, **{"max_new_tokens": 4, **options}))
            return client.generate(text, **{"max_new_tokens": 4, **options})
        return action

    bad = [("temperature", v, {}) for v in (math.inf, math.nan, -1.0, "0.5")]
    bad += [("top_k", v, {}) for v in (0, -1)]  # greedy: they would change nothing
    bad += [("top_p", v, {"temperature": 1.0}) for v in (0, 1.5, math.nan)]
    bad += [("stop", v, {}) for v in ("####", None)]
    bad += [("seed", v, {"temperature": 1.0}) for v in (2**64, -1, "7")]
    bad += [("max_new_tokens", v, {}) for v in (0, -1, "4", 10**9)]
    bad += [("draft_depth", v, {"speculative": True}) for v in (0, 3)]
    bad += [("draft_depth", 1, {}), ("speculative", "no", {})]
    for name, value, extra in bad:
        options = {**extra, name: value}
        probes.append(Probe(area, f"generate {name}={value!r}", ask("generate", **options),
                            names=(name,)))
    for name, value in (("temperature", math.nan), ("stop", "####"), ("max_new_tokens", 10**9)):
        probes.append(Probe(area, f"stream {name}={value!r}", ask("stream", **{name: value}),
                            names=(name,)))
    for method, texts in (("generate", (None, 123, b"What is 7 * 8?", "")),
                          ("stream", (None, ""))):
        for text in texts:
            probes.append(Probe(area, f"{method} text={text!r}", ask(method, text),
                                names=("text",)))
        probes.append(Probe(area, f"{method} a prompt longer than max_seq_len",
                            ask(method, "seven " * 300), names=("max_seq_len",)))
    for text in ([], ["What is 7 * 8?", 123], {"What is 7 * 8?"}):
        probes.append(Probe(area, f"generate text={text!r}", ask("generate", text),
                            names=("text",)))

    def alone(text: str, **options: Any) -> str:
        return book_client().generate(text, max_new_tokens=12, **options)["generated_text"]

    def each_alone(texts: list[str]) -> Callable[[Ctx, Any], str | None]:
        def check(ctx: Ctx, results: list[dict]) -> str | None:
            got = [r["generated_text"] for r in results]
            return None if got == [alone(t) for t in texts] else "an answer differs from alone"
        return check

    many = [f"What is {12 + i} * {3 + i % 7}?" for i in range(20)]  # > max_batch_size 16
    probes += [
        Probe(area, "generate texts of different lengths (valid)",
              lambda ctx: book_client().generate(QUESTIONS, max_new_tokens=12), "accept",
              check=each_alone(QUESTIONS)),
        Probe(area, "generate 20 texts, more than max_batch_size (valid)",
              lambda ctx: book_client().generate(many, max_new_tokens=12), "accept",
              check=each_alone(many)),
        Probe(area, "generate a tuple of texts (valid)",
              lambda ctx: book_client().generate(tuple(QUESTIONS[:2]), max_new_tokens=12),
              "accept", check=each_alone(QUESTIONS[:2])),
    ]

    # the decoding function itself
    def decode(tokens: Callable[[Transformer], Any], **options: Any) -> Callable[[Ctx], Any]:
        def action(ctx: Ctx) -> Any:
            model = book_model()
            return generate(model, tokens(model), **{"max_new_tokens": 4, **options})
        return action

    def prompt(batch: int = 1, length: int = 5) -> Callable[[Transformer], torch.Tensor]:
        return lambda model: torch.randint(0, model.args.vocab_size, (batch, length),
                                           generator=torch.Generator().manual_seed(0))

    low_level = {
        "float tokens": (lambda m: prompt()(m).float(), {}, "tokens"),
        "1-D tokens": (lambda m: prompt()(m)[0], {}, "tokens"),
        "a list of ids": (lambda m: prompt()(m).tolist(), {}, "tokens"),
        "an id = vocab_size": (lambda m: prompt()(m) * 0 + m.args.vocab_size, {}, "vocab_size"),
        "an empty prompt (1, 0)": (lambda m: prompt(1, 0)(m), {}, "tokens"),
        "a batch of 17 > max_batch_size 16": (prompt(17), {}, "max_batch_size"),
        "stop_token = vocab_size": (prompt(), {"stop_token": 1024}, "stop_token"),  # book's
        "temperature nan": (prompt(), {"temperature": math.nan}, "temperature"),
        "max_new_tokens past max_seq_len": (prompt(), {"max_new_tokens": 300}, "max_seq_len"),
        "a generator that is not a torch.Generator": (prompt(), {"generator": 42}, "generator"),
    }
    for what, (tokens, options, name) in low_level.items():
        probes.append(Probe(area, f"generate(): {what}", decode(tokens, **options),
                            names=(name,)))

    def nan_model() -> Transformer:
        model = load_checkpoint(BOOK_CHECKPOINT).model
        with torch.no_grad():
            model.head.weight.fill_(math.nan)
        return model

    probes.append(Probe(area, "generate(): a model with NaN weights",
                        lambda ctx: generate(nan_model(), prompt()(book_model()), 4),
                        names=("weights",)))

    # after a failed or abandoned call, the model has its own mode and no cache
    def mode_after(fail: Callable[[Transformer], Any]) -> Callable[[Ctx], Transformer]:
        def action(ctx: Ctx) -> Transformer:
            model = load_checkpoint(BOOK_CHECKPOINT).model.train()
            with contextlib.suppress(ValueError, FloatingPointError):
                fail(model)
            return model
        return action

    def restored(ctx: Ctx, model: Transformer) -> str | None:
        caches = [n for n, _ in model.named_buffers() if ".cache_" in n]
        if not model.training:
            return "the model was left in eval mode"
        return f"the model still holds caches {caches[:2]}" if caches else None

    def nan_head(model: Transformer) -> Any:
        with torch.no_grad():
            model.head.weight.fill_(math.nan)
        return generate(model, prompt()(model), 4)

    def left_early(model: Transformer) -> None:
        for _ in stream(model, prompt()(model), 8):
            break

    for what, fail in {"max_new_tokens 0": lambda m: generate(m, prompt()(m), 0),
                       "a batch of 17": lambda m: generate(m, prompt(17)(m), 4),
                       "NaN logits": nan_head, "a stream left early": left_early}.items():
        probes.append(Probe(area, f"training mode restored after {what}", mode_after(fail),
                            "accept", check=restored))

    # one client, several callers at once
    def threads(ctx: Ctx) -> tuple[list[str], list[str]]:
        calls = [(QUESTIONS[(t + q) % len(QUESTIONS)],
                  dict(temperature=0.8 if q == 2 else 0.0, seed=t, speculative=q == 1))
                 for t in range(4) for q in range(3)]
        expected = [alone(text, **options) for text, options in calls]

        def asks(t: int) -> list[str]:
            return [alone(text, **options) for text, options in calls[3 * t:3 * t + 3]]

        with ThreadPoolExecutor(4) as pool:
            together = [answer for answers in pool.map(asks, range(4)) for answer in answers]
        return together, expected

    def interleaved(ctx: Ctx) -> tuple[list[str], list[str]]:
        client = book_client()
        expected = ["".join(client.stream(q, max_new_tokens=12)) for q in QUESTIONS[:2]]
        first, second = (iter(client.stream(q, max_new_tokens=12)) for q in QUESTIONS[:2])
        texts = [next(first), next(second)]
        between = client.generate(QUESTIONS[2], max_new_tokens=12)["generated_text"]
        texts = [texts[0] + "".join(first), texts[1] + "".join(second)]
        return texts + [between], expected + [alone(QUESTIONS[2])]

    def equal(ctx: Ctx, result: tuple[list[str], list[str]]) -> str | None:
        together, expected = result
        wrong = sum(a != b for a, b in zip(together, expected))
        return f"{wrong} of {len(expected)} answers differ from the same question alone" \
            if wrong else None

    probes += [
        Probe(area, "4 threads x 3 questions on one client, each as alone", threads, "accept",
              check=equal),
        Probe(area, "two interleaved streams and a generate, each as alone", interleaved,
              "accept", check=equal),
    ]
    return probes


# ------------------------------------------------------------------------------------- 5. the chat
def chat_stdin() -> list[Probe]:
    area, probes = "chat", []

    def printable_with(wanted: str) -> Callable[[Ctx, str], str | None]:
        """Check: no control character but newline and tab reaches the terminal raw, and the
        output shows `wanted` (the escaped input, U+FFFD, the error, the echo)."""
        def check(ctx: Ctx, out: str) -> str | None:
            raw = sorted({c for c in out if unicodedata.category(c) == "Cc" and c not in "\n\t"})
            if raw:
                return f"raw control characters {raw} in the output"
            return None if wanted in out else f"{wanted!r} not in the output"
        return check

    inputs = {
        "invalid UTF-8": (b"bad \xff\xfe byte\n", "\ufffd"),
        "a lone surrogate (UTF-8 bytes)": (b"\xed\xa0\x80 What is 2 + 2?\n", "\ufffd"),
        "ANSI colour escapes": (b"\x1b[31mWhat is 7 * 8?\x1b[0m\n", "\\x1b[31m"),
        "an OSC title and BEL": (b"\x1b]0;owned\x07What is 7?\n", "\\x07"),
        "a C1 CSI (U+009B)": ("\u009b2JWhat is 7?\n".encode(), "\\x9b"),
        "a NUL byte": (b"What\x00 is 2 + 2?\n", "\\x00"),
        "a carriage return": (b"What is 2 + 2?\rq\n", "> q"),
        "a very long line (20,000 words)": (b"seven " * 20_000 + b"\n", "error: the prompt has"),
        "a very long word (1 MB)": (b"x" * 2**20 + b"\n", "error: the prompt has"),
        "end of input at once": (b"", "> \n"),
        "end of input without a newline": (b"What is 7 * 8?", "Work:"),
        "blank lines, then q": (b"\n \n\t\nq\n", "> q"),
    }
    for what, (data, wanted) in inputs.items():
        probes.append(Probe(area, f"stdin: {what}", lambda ctx, d=data: book_chat(d), "accept",
                            check=printable_with(wanted)))
    question = b"What is 7 * 8?\n"
    options = [("--temperature", "nan", "temperature"), ("--top-k", "0", "top_k"),
               ("--top-p", "2", "top_p"), ("--seed", str(2**64), "seed"),
               ("--max-new-tokens", "0", "max_new_tokens"),
               ("--max-new-tokens", "abc", "--max-new-tokens")]
    for option, value, name in options:
        probes.append(Probe(area, f"{option} {value}",
                            lambda ctx, o=option, v=value: chat(question, "--book", o, v),
                            names=(option, name)))

    def checkpoint_at(make: Callable[[Ctx], pathlib.Path]) -> Callable[[Ctx], str]:
        return lambda ctx: chat(question, "--checkpoint", make(ctx))

    def broken_run(ctx: Ctx) -> pathlib.Path:
        run = copy(base_run(), ctx.tmp / "run")
        flip(steps_of(run)[-1] / "model.safetensors")
        return run

    probes += [
        Probe(area, "--checkpoint a missing folder",
              checkpoint_at(lambda ctx: ctx.tmp / "nowhere"), names=("nowhere",)),
        Probe(area, "--checkpoint a file", checkpoint_at(my_file), names=("my-notes.txt",)),
        Probe(area, "--checkpoint a foreign folder",
              checkpoint_at(lambda ctx: notes(ctx.tmp / "my-notes")), names=("my-notes",)),
        Probe(area, "--checkpoint a run with a damaged checkpoint", checkpoint_at(broken_run),
              names=("model.safetensors",)),
    ]
    return probes


# ------------------------------------------------------------------------------------- 6. the model
def model_inputs() -> list[Probe]:
    area, probes = "model", []

    def forward(tokens: Callable[[], Any], **kw: Any) -> Callable[[Ctx], Any]:
        def action(ctx: Ctx) -> Any:
            with torch.no_grad():
                return tiny_model()(tokens(), **kw)
        return action

    def ids() -> torch.Tensor:
        return torch.randint(0, 260, (2, 6), generator=torch.Generator().manual_seed(0))

    cases = {
        "an id = vocab_size": (lambda: ids() * 0 + 260, {}, "vocab_size"),
        "a negative id": (lambda: ids() - 300, {}, "vocab_size"),
        "float tokens": (lambda: ids().float(), {}, "tokens"),
        "bool tokens": (lambda: ids() > 100, {}, "tokens"),
        "1-D tokens": (lambda: ids()[0], {}, "tokens"),
        "3-D tokens": (lambda: ids()[None], {}, "tokens"),
        "tokens on the meta device": (lambda: ids().to("meta"), {}, "tokens"),
        "longer than max_seq_len": (lambda: torch.zeros(1, 10_000, dtype=torch.long), {},
                                    "max_seq_len"),
        "start_pos -1": (ids, {"start_pos": -1}, "start_pos"),
        "start_pos = max_seq_len": (ids, {"start_pos": ModelArgs.tiny().max_seq_len},
                                    "start_pos"),
        "start_pos 1.5": (ids, {"start_pos": 1.5}, "start_pos"),
        "start_pos '0'": (ids, {"start_pos": "0"}, "start_pos"),
    }
    for what, (tokens, kw, name) in cases.items():
        probes.append(Probe(area, f"forward: {what}", forward(tokens, **kw), names=(name,)))

    def loss(targets: Callable[[], Any], mtp_lambda: Any = 0.3) -> Callable[[Ctx], Any]:
        return lambda ctx: tiny_model().loss(ids(), targets(), mtp_lambda)

    for what, action, name in [
            ("targets of another shape", loss(lambda: ids()[:, :3]), "targets"),
            ("targets out of range", loss(lambda: ids() + 300), "targets"),
            ("float targets", loss(lambda: ids().float()), "targets"),
            ("mtp_lambda -1", loss(ids, -1.0), "mtp_lambda"),
            ("mtp_lambda nan", loss(ids, math.nan), "mtp_lambda"),
            ("mtp_lambda '0.3'", loss(ids, "0.3"), "mtp_lambda")]:
        probes.append(Probe(area, f"loss: {what}", action, names=(name,)))
    probes += [
        Probe(area, "update_bias of the wrong shape",
              lambda ctx: tiny_model().update_bias(torch.zeros(3, 3)), names=("expert_load",)),
        Probe(area, "allocate_cache(0)", lambda ctx: tiny_model().allocate_cache(0),
              names=("batch_size",)),
        Probe(area, "allocate_cache past max_batch_size",
              lambda ctx: tiny_model().allocate_cache(10**6), names=("batch_size",)),
        Probe(area, "put_cache([])", lambda ctx: tiny_model().put_cache([]), names=("caches",)),
    ]
    fields = [("dim", 0), ("dim", "32"), ("rms_norm_eps", math.nan), ("attn_impl", "flash"),
              ("n_expert_groups", 3), ("qk_rope_head_dim", 7), ("fp8", "yes"), ("dimm", 8)]
    for name, value in fields:
        probes.append(Probe(area, f"ModelArgs {name}={value!r}",
                            lambda ctx, n=name, v=value: ModelArgs.tiny(**{n: v}), names=(name,)))
    probes.append(Probe(area, "Transformer with dim 10**6 (too big for memory)",
                        lambda ctx: Transformer(ModelArgs.tiny(dim=10**6)), names=("dim",)))
    return probes


# --------------------------------------------------------------------------- 7. tokenizer and data
def tokenizer_inputs() -> list[Probe]:
    area, probes = "tokenizer", []
    texts = ["the tide was high", "the tide was low", "潮水"] * 10
    for value in (10, "300", 300.0):
        probes.append(Probe(area, f"train vocab_size={value!r}",
                            lambda ctx, v=value: BPETokenizer.train(texts, v),
                            names=("vocab_size",)))
    for what, given in (("a None among the texts", texts + [None]), ("one str", "the tide"),
                        ("an int", 123)):
        probes.append(Probe(area, f"train texts: {what}",
                            lambda ctx, g=given: BPETokenizer.train(g, 300), names=("texts",)))

    def loaded(make: Callable[[pathlib.Path], Any] | None) -> Callable[[Ctx], Any]:
        """BPETokenizer.load of ctx.tmp/tok.json, made first by make(path) (None: absent)."""
        def action(ctx: Ctx) -> Any:
            if make is not None:
                make(ctx.tmp / "tok.json")
            return BPETokenizer.load(ctx.tmp / "tok.json")
        return action

    for what, make in (("a missing file", None), ("a folder", pathlib.Path.mkdir),
                       ("bytes that are not UTF-8", writes(bytes(range(128, 256)) * 2)),
                       ("a truncated tokenizer.json",
                        lambda p: p.write_text(tokenizer().tokenizer.to_str()[:500])),
                       ("a tokenizer.json without the special tokens",
                        lambda p: Tokenizer(models.BPE()).save(str(p)))):
        probes.append(Probe(area, f"load {what}", loaded(make), names=("tok.json",)))
    for what, ids in (("id = vocab_size", [300]), ("a float id", [1.5]), ("a str", "abc")):
        probes.append(Probe(area, f"decode {what}", lambda ctx, i=ids: tokenizer().decode(i),
                            names=("token id", "ids")))
    for text in (None, 123, b"bytes", "\ud800"):
        probes.append(Probe(area, f"encode {text!r}", lambda ctx, t=text: tokenizer().encode(t),
                            names=("text",)))
    probes.append(Probe(area, "special_id('<|bogus|>')",
                        lambda ctx: tokenizer().special_id("<|bogus|>"), names=("<|bogus|>",)))

    def round_trip(text: str) -> Callable[[Ctx], tuple[str, list[int]]]:
        return lambda ctx: (text, tokenizer().encode(text))

    def same_text(ctx: Ctx, result: tuple[str, list[int]]) -> str | None:
        text, ids = result
        if tokenizer().eot_id in ids:
            return "a special token's name became the special token"
        return None if tokenizer().decode(ids) == text else "decode(encode(text)) != text"

    for what, text in (("a special token's name in text", "a <|endoftext|> b <|user|>"),
                       ("emoji, Chinese, NUL and controls", "🌊 潮水 \0 \x1b[2J tab\tend")):
        probes.append(Probe(area, f"round trip of {what} (valid)", round_trip(text), "accept",
                            check=same_text))
    return probes


def data_inputs() -> list[Probe]:
    area, probes = "data", []

    def read(name: str, make: Callable[[pathlib.Path], Any] | None, **kw: Any
             ) -> Callable[[Ctx], Any]:
        """read_documents of ctx.tmp/name, made first by make(path) (None: it does not exist)."""
        def action(ctx: Ctx) -> Any:
            if make is not None:
                make(ctx.tmp / name)
            return read_documents(ctx.tmp / name, **kw)
        return action

    for what, name, make, kw in [
            ("a missing file", "missing.txt", None, {}),
            ("a folder", "folder", pathlib.Path.mkdir, {}),
            ("NUL bytes", "nul.txt", writes(b"a\n\nb\0"), {}),
            ("invalid UTF-8", "bad.txt", writes(b"a\n\n\xff"), {}),
            ("a file over the limit", "big.txt", writes(b"x" * 100), {"limit": 10}),
            ("limit -1", "small.txt", writes(b"x"), {"limit": -1})]:
        probes.append(Probe(area, f"read_documents: {what}", read(name, make, **kw),
                            names=(name, "limit") if "limit" in kw else (name,)))
    probes.append(Probe(area, "read_documents: /dev/zero", lambda ctx: read_documents("/dev/zero"),
                        names=("/dev/zero",)))

    def bom_crlf(ctx: Ctx, docs: list[Document]) -> str | None:
        texts = [d.text for d in docs]
        return None if texts == ["first", "second line\nmore", "third"] else f"read {texts}"

    probes.append(Probe(area, "read_documents: BOM and CRLF (valid)",
                        read("bom.txt", writes(b"\xef\xbb\xbffirst\r\n\r\nsecond line\r\n"
                                               b"more\r\n\r\nthird\r\n")),
                        "accept", check=bom_crlf))

    docs = [Document("text", f"the tide was {'high' if i % 2 else 'low'} at {i}")
            for i in range(30)]

    def corpus() -> Corpus:
        return Corpus(docs)

    def few_paragraphs(ctx: Ctx) -> Corpus:
        (ctx.tmp / "few.txt").write_text("a\n\nb\n\nc")
        return Corpus.from_text_file(ctx.tmp / "few.txt")

    for what, action, name in [
            ("Corpus of 5 documents", lambda ctx: Corpus(docs[:5]), "val_every"),
            ("Corpus val_every=1", lambda ctx: Corpus(docs, val_every=1), "val_every"),
            ("Corpus fim_rate=2", lambda ctx: Corpus(docs, fim_rate=2), "fim_rate"),
            ("Corpus fim_rate='0.1'", lambda ctx: Corpus(docs, fim_rate="0.1"), "fim_rate"),
            ("Corpus of str instead of Document", lambda ctx: Corpus([d.text for d in docs]),
             "documents"),
            ("batch split 'test'", lambda ctx: corpus().batch("test", 2, 8), "split"),
            ("batch batch_size=0", lambda ctx: corpus().batch("train", 0, 8), "batch_size"),
            ("batch seq_len past the split", lambda ctx: corpus().batch("val", 2, 10**6),
             "seq_len"),
            ("batch seq_len=1.5", lambda ctx: corpus().batch("train", 2, 1.5), "seq_len"),
            ("packed seq_len=0", lambda ctx: corpus().packed("train", 0), "seq_len"),
            ("build_documents(0)", lambda ctx: build_documents(0), "docs_per_domain"),
            ("build_documents('8')", lambda ctx: build_documents("8"), "docs_per_domain"),
            ("Corpus.from_text_file of 3 paragraphs", few_paragraphs, "few.txt")]:
        probes.append(Probe(area, what, action, names=(name,)))
    return probes


def catalogue() -> list[Probe]:
    return (train_cli() + resume() + checkpoints() + releases() + generation() + chat_stdin()
            + model_inputs() + tokenizer_inputs() + data_inputs())


# ---------------------------------------------------------------------------------------- report
def report(results: list[tuple[Probe, str, str]], seconds: float) -> None:
    areas = list(dict.fromkeys(p.area for p, _, _ in results))
    columns = VERDICTS + (("harness",) if any(v == "harness" for _, v, _ in results) else ())
    header = f"{'area':<12}{'probes':>7}" + "".join(f"{c:>9}" for c in columns)
    print(header)
    print("-" * len(header))
    for area in areas + ["all"]:
        verdicts = [v for p, v, _ in results if area in ("all", p.area)]
        if area == "all":
            print("-" * len(header))
        print(f"{area:<12}{len(verdicts):>7}" + "".join(f"{verdicts.count(c):>9}"
                                                        for c in columns))
    bad = [(p, v, m) for p, v, m in results if v not in ("clear", "ok")]
    print(f"\n{len(bad)} probes neither clear nor ok:" if bad else "\nevery probe clear or ok")
    for probe, verdict, message in bad:
        print(f"  {verdict:<8} {probe.id}: {message[:300]}")
    print(f"\n{len(results)} probes in {seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    global SESSION
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print the probes, run none")
    parser.add_argument("-k", metavar="SUBSTRING", default="",
                        help="only the probes whose area/name contains SUBSTRING")
    opts = parser.parse_args(argv)
    probes = [p for p in catalogue() if opts.k in p.id]
    if opts.list:
        for p in probes:
            print(f"{p.id}  [{p.expect}]" + (f"  names: {', '.join(p.names)}" if p.names else ""))
        return 0
    start = time.perf_counter()
    SESSION = pathlib.Path(tempfile.mkdtemp(prefix="probe-inputs-"))
    results = []
    try:
        for area in dict.fromkeys(p.area for p in probes):
            began = time.perf_counter()
            for probe in (p for p in probes if p.area == area):
                results.append((probe, *run_probe(probe)))
            print(f"{area}: {sum(p.area == area for p in probes)} probes, "
                  f"{time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(SESSION, ignore_errors=True)
    report(results, time.perf_counter() - start)
    return 1 if any(v == "harness" for _, v, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
