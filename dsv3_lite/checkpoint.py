"""Checkpoints: everything a training run needs to continue, in one directory.

    model.safetensors   the weights (safetensors: tensors only, no pickled code,
                        each tensor stored once: the MTP modules' embedding and
                        head are the main model's)
    config.json         ModelArgs, TrainArgs and the data options, as JSON
    tokenizer.json      the tokenizer, in Hugging Face's format
    trainer_state.pt    optimizer moments, step, data position, RNG states and
                        history (`Trainer.state_dict`)
    manifest.json       the size and SHA-256 hash of each file above

A save completes or changes nothing: the files are written into a hidden folder
beside the target, flushed to the disk (fsync), and the folder is renamed into
place in one step. A training run keeps its checkpoints in step folders of a run
folder (`save_step`: runs/tiny/step-00000200, ...; the newest `keep` are kept), so
a save cut short by a crash, a kill or a full disk leaves the previous checkpoint
as it was; there the flush runs behind training, and a step folder is removed only
once the newer ones are on the disk. `load_checkpoint` of a run folder loads its
newest checkpoint whose files match their manifest, and names any newer one it had
to skip.

Loading checks every file and every tensor: a file that differs from the manifest
(flipped bytes, an edited config, another tokenizer), truncated, missing, left over
or of another shape is an error that names it, never a partial load. Checkpoints
without a manifest (the book's shipped one, older releases) load unverified.

`export` copies a checkpoint without its trainer state (the optimizer's two moments
take twice the weights' size): what inference needs, and what the book ships.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import pathlib
import pickle
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator, NamedTuple

import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dsv3_lite.config import ModelArgs, check_int
from dsv3_lite.model import Transformer
from dsv3_lite.tokenizer import BPETokenizer
from dsv3_lite.trainer import Trainer, TrainArgs

FILES = ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt")
MANIFEST = "manifest.json"
# The book's trained checkpoint, shipped inside the package (chapter 8; the README
# gives the command that trains it)
BOOK_CHECKPOINT = pathlib.Path(__file__).with_name("checkpoints") / "tiny8"
STEP_FOLDER = re.compile(r"step-(\d{8})")
LEFTOVER = re.compile(r"\.step-\d{8}\.(tmp|old)-\d+")  # of a save that was killed


class Checkpoint(NamedTuple):
    """A loaded checkpoint: the model (in training mode), its tokenizer, the run's
    TrainArgs, the trainer state for `Trainer.load_state_dict` (None if saved
    without a trainer, or `export`ed), the data options given at saving, the
    folder it was read from, and why any newer checkpoint of a run was skipped."""

    model: Transformer
    tokenizer: BPETokenizer
    train_args: TrainArgs | None
    trainer_state: dict[str, Any] | None
    data: dict[str, Any]
    path: pathlib.Path | None = None
    skipped: tuple[str, ...] = ()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256(path: str | pathlib.Path) -> str:
    """The SHA-256 hash of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor],
                                             dict[str, str]]:
    """The model's tensors by name, each shared tensor under its first name only,
    and a map from every name to the name it is stored under."""
    state, stored_as, first = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape))
        stored_as[name] = first.setdefault(key, name)
        if stored_as[name] == name:
            state[name] = tensor
    return state, stored_as


def _fsync(path: pathlib.Path) -> None:
    """Flush a folder's entries (new names, renames) to the disk, where the system
    allows it (not on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: pathlib.Path, data: bytes, sync: bool) -> None:
    """Write a new file; with `sync`, wait until its bytes are on the disk."""
    with open(path, "xb") as file:
        file.write(data)
        file.flush()
        if sync:
            os.fsync(file.fileno())


def _sync_folder(directory: pathlib.Path) -> None:
    """Flush a folder's files, the folder and its parent to the disk."""
    for path in directory.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())
    _fsync(directory)
    _fsync(directory.parent)


def _publish(files: Iterable[tuple[str, bytes]], directory: pathlib.Path,
             manifest: bool, sync: bool, replace: bool) -> None:
    """Write `files` ((name, bytes) pairs, made as they are asked for) and, with
    `manifest`, their manifest into a hidden folder beside `directory`, then rename
    it to `directory` (which must not exist, be empty, or with `replace` is swapped
    out and removed). With `sync`, every file and folder is flushed to the disk
    (fsync) before the rename. Each file is written, flushed and hashed in worker
    threads while the next one is made (the hashing and the disk wait release the
    GIL). A failure removes the hidden folder and leaves `directory` as it was; a
    full disk says so."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    for leftover in (temporary, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        temporary.mkdir()
        with ThreadPoolExecutor(max_workers=4) as pool:
            pending = []
            for name, data in files:
                written = pool.submit(_write_bytes, temporary / name, data, sync)
                digest = pool.submit(_digest, data) if manifest else None
                pending.append((name, len(data), written, digest))
            listed = {}
            for name, size, written, digest in pending:
                written.result()
                if manifest:
                    listed[name] = {"bytes": size, "sha256": digest.result()}
        if manifest:
            text = json.dumps({"files": listed}, indent=2) + "\n"
            _write_bytes(temporary / MANIFEST, text.encode(), sync)
        if sync:
            _fsync(temporary)
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        elif directory.exists():
            if not replace:
                raise FileExistsError(f"{directory} exists and is not empty")
            os.rename(directory, old)
        os.rename(temporary, directory)
    except BaseException as err:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, "the disk is full: the checkpoint "
                          f"{directory} was not saved, and the folder holds what it "
                          "held before (free some space, then save or --resume "
                          "again)",
                          str(directory)) from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    if sync:
        _fsync(directory.parent)


def _config(model: Transformer, trainer: Trainer | None,
            data: dict[str, Any] | None) -> dict[str, Any]:
    return {"model": dataclasses.asdict(model.args),
            "train": dataclasses.asdict(trainer.args) if trainer else None,
            "data": data or {}, "trainer_state": trainer is not None}


def _files(model: Transformer, tokenizer: BPETokenizer, trainer: Trainer | None,
           data: dict[str, Any] | None) -> Iterator[tuple[str, bytes]]:
    """A checkpoint's files as (name, bytes), the largest first."""
    if trainer is not None:
        buffer = io.BytesIO()
        torch.save(trainer.state_dict(), buffer)
        yield "trainer_state.pt", buffer.getvalue()
    state, _ = _unique_state(model)
    yield "model.safetensors", safetensors.torch.save(
        {k: v.detach().cpu().contiguous() for k, v in state.items()})
    yield "config.json", (json.dumps(_config(model, trainer, data), indent=2)
                          + "\n").encode()
    yield "tokenizer.json", tokenizer.tokenizer.to_str().encode()


def save_checkpoint(directory: str | pathlib.Path, model: Transformer,
                    tokenizer: BPETokenizer, trainer: Trainer | None = None,
                    data: dict[str, Any] | None = None, *, overwrite: bool = False,
                    durable: bool = True) -> pathlib.Path:
    """Save `model`, `tokenizer` and (if given) the trainer's state and TrainArgs
    as the folder `directory`, all at once (see the module docstring); `data`
    records how the corpus was made, as JSON. `directory` must be new or empty,
    unless `overwrite`. `durable=False` skips the fsyncs and the manifest (only to
    measure what they cost: such a checkpoint loads unverified). Returns it."""
    directory = pathlib.Path(directory)
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise ValueError(f"{directory} is not empty: a checkpoint is saved into a "
                         "new or empty folder (overwrite=True replaces it)")
    _publish(_files(model, tokenizer, trainer, data), directory, manifest=durable,
             sync=durable, replace=overwrite)
    return directory


def steps_of(run: str | pathlib.Path) -> list[pathlib.Path]:
    """The step folders of a run folder, oldest first."""
    run = pathlib.Path(run)
    if not run.is_dir():
        return []
    return sorted(p for p in run.iterdir()
                  if STEP_FOLDER.fullmatch(p.name) and p.is_dir())


# a run folder -> the flush of its last save_step (one thread does them in order)
_flushes: dict[pathlib.Path, Future] = {}
_flusher = ThreadPoolExecutor(max_workers=1)


def save_step(run: str | pathlib.Path, model: Transformer, tokenizer: BPETokenizer,
              trainer: Trainer, data: dict[str, Any] | None = None, keep: int = 2,
              durable: bool = True) -> pathlib.Path:
    """Save the run's checkpoint at `trainer.step` as `run`/step-NNNNNNNN (complete
    and verified by its manifest when this returns), then remove any step folder
    of a later step (left by a run that was resumed from an earlier one) and all
    but the newest `keep`. The flush of the new folder to the disk (fsync) runs in
    a background thread while training goes on, and the older folders are removed
    only after it, so a power cut never leaves fewer sound checkpoints on the disk
    than before; `flushed(run)` waits for it (the next save_step does, and the
    interpreter at exit). `durable=False`: no manifest, no flush (to measure their
    cost). Returns the new folder."""
    check_int("keep", keep, 1)
    run = pathlib.Path(run)
    flushed(run)
    directory = run / f"step-{trainer.step:08d}"
    if run.is_dir():
        for path in run.iterdir():
            if LEFTOVER.fullmatch(path.name):
                shutil.rmtree(path, ignore_errors=True)
    _publish(_files(model, tokenizer, trainer, data), directory, manifest=durable,
             sync=False, replace=True)
    steps = steps_of(run)
    for path in steps[steps.index(directory) + 1:]:  # of a later step
        shutil.rmtree(path)
    stale = steps[:max(0, steps.index(directory) - keep + 1)]
    if durable:
        _flushes[run.resolve()] = _flusher.submit(_flush_then_remove, directory,
                                                  stale)
    else:
        for path in stale:
            shutil.rmtree(path)
    return directory


def _flush_then_remove(directory: pathlib.Path, stale: list[pathlib.Path]) -> None:
    try:
        _sync_folder(directory)
    except OSError as err:
        raise OSError(err.errno, f"the checkpoint {directory} could not be flushed "
                      f"to the disk ({err.strerror or err}); the older checkpoints "
                      "are kept", str(directory)) from None
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


def flushed(run: str | pathlib.Path) -> None:
    """Wait until the last `save_step` of `run` is on the disk and its older step
    folders are removed; raise the error the flush met, if any (a full disk, a
    failing device)."""
    pending = _flushes.pop(pathlib.Path(run).resolve(), None)
    if pending is not None:
        pending.result()


def write_file(path: str | pathlib.Path, text: str) -> None:
    """Replace a text file in one step (a new file, fsync, rename)."""
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.unlink(missing_ok=True)
        _write_bytes(temporary, text.encode("utf-8"), True)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def load_weights(model: nn.Module, path: str | pathlib.Path) -> None:
    """Load a `model.safetensors` into `model`, all or nothing: every tensor the
    model has must be in the file, with the model's shape, and nothing else."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        loaded = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path} is truncated or corrupt ({err}): save it again, "
                         "or use an earlier checkpoint") from None
    expected, stored_as = _unique_state(model)
    missing = [n for n in expected if n not in loaded]
    extra = [n for n in loaded if n not in expected]
    reshaped = [f"{n} is {tuple(loaded[n].shape)} in the file but "
                f"{tuple(t.shape)} in the model"
                for n, t in expected.items()
                if n in loaded and loaded[n].shape != t.shape]
    for problems, what in ((missing, "lacks tensors the model needs"),
                           (extra, "has tensors the model does not"),
                           (reshaped, "holds tensors of other shapes")):
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ValueError(f"{path} {what}: {'; '.join(problems[:3])}{more}. It "
                             "was saved from a model of another configuration")
    model.load_state_dict({name: loaded[stored_as[name]] for name in stored_as})


def _read_config(directory: pathlib.Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        missing = [f.name for f in dataclasses.fields(ModelArgs)
                   if f.name not in config["model"]]
        if missing:  # a default (V3's full size) would not describe the weights
            raise ValueError(f"{directory / 'config.json'} lacks the model fields "
                             f"{', '.join(missing)}: it must give every ModelArgs "
                             "field")
        train = TrainArgs(**config["train"]) if config["train"] else None
        return {"model": ModelArgs(**config["model"]), "train": train,
                "data": config["data"],
                "trainer_state": config.get("trainer_state", train is not None)}
    except json.JSONDecodeError as err:
        raise ValueError(f"{directory / 'config.json'} is truncated or not JSON "
                         f"({err})") from None
    except (KeyError, TypeError) as err:
        raise ValueError(f"{directory / 'config.json'} does not describe a "
                         f"dsv3_lite run ({type(err).__name__}: {err})") from None


def verify_manifest(directory: str | pathlib.Path) -> None:
    """Check every file of a checkpoint against its manifest (size and SHA-256):
    a ValueError names the first file that differs, is missing or is not listed."""
    directory = pathlib.Path(directory)
    try:
        text = (directory / MANIFEST).read_text(encoding="utf-8")
        listed = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{directory / MANIFEST} is truncated or corrupt ({err})") \
            from None
    needed = set(FILES[:3]) | {p.name for p in directory.iterdir() if p.name in FILES}
    for name in sorted(needed - set(listed)):
        raise ValueError(f"{directory / name} is not in {MANIFEST}: the checkpoint "
                         "was changed after it was saved")
    for name, entry in listed.items():
        path = directory / name
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"{path} is missing or not a plain file, but "
                             f"{MANIFEST} lists it")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(f"{path} has {size:,} bytes, {MANIFEST} records "
                             f"{entry['bytes']:,}: truncated or changed after saving")
        if sha256(path) != entry["sha256"]:
            raise ValueError(f"{path} does not match its SHA-256 hash in {MANIFEST}: "
                             "its bytes changed after saving (a disk error, or an "
                             "edit)")


def _load_folder(directory: pathlib.Path, device: torch.device | str,
                 check: bool, in_run: bool = False) -> Checkpoint:
    """A checkpoint folder; a step folder of a run (`in_run`) must have its
    manifest."""
    absent = [f for f in FILES[:3] if not (directory / f).is_file()]
    if absent:
        raise FileNotFoundError(f"{directory} is not a dsv3_lite checkpoint: "
                                f"{', '.join(absent)} missing (a checkpoint holds "
                                f"{', '.join(FILES)})")
    if check and in_run and not (directory / MANIFEST).is_file():
        raise ValueError(f"{directory} has no {MANIFEST}: a save that did not reach "
                         "the disk (a power cut?) or a folder made by hand")
    if check and (directory / MANIFEST).exists():
        verify_manifest(directory)
    config = _read_config(directory)
    with torch.device("meta"):  # shapes only: the weights come from the file
        model = Transformer(config["model"])
    model.to_empty(device=device)
    load_weights(model, directory / "model.safetensors")
    tokenizer = BPETokenizer.load(directory / "tokenizer.json")
    state = None
    if config["trainer_state"]:
        path = directory / "trainer_state.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing: config.json says the "
                                    "checkpoint has a trainer state") from None
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            raise ValueError(f"{path} is truncated or corrupt ({err})") from None
    return Checkpoint(model.train(), tokenizer, config["train"], state,
                      config["data"], directory)


def load_checkpoint(directory: str | pathlib.Path,
                    device: torch.device | str = "cpu",
                    verify: bool = True) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`, or the newest sound one of a
    run folder written by `save_step` (`skipped` says why newer ones were not
    taken). Its files are checked against the manifest (unless `verify=False`);
    the model is built from config.json on `device`, without drawing random
    numbers (torch's random state stays as it was), and takes the saved weights."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device ({device!r}) is not a torch device: "
                         f"{err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device ({device}): torch sees no CUDA GPU here")
    directory = pathlib.Path(directory)
    steps = steps_of(directory)
    if not steps:
        return _load_folder(directory, device, verify)
    skipped = []
    for step in reversed(steps):
        try:
            loaded = _load_folder(step, device, verify, in_run=True)
        except (ValueError, FileNotFoundError) as err:
            skipped.append(f"{step.name} skipped: {err}")
            continue
        return loaded._replace(skipped=tuple(skipped))
    raise ValueError(f"{directory} holds no sound checkpoint: "
                     + "; ".join(skipped))


def export_problem(target: str | pathlib.Path) -> str | None:
    """Why exporting into `target` would destroy something, or None: it must be
    new, an empty folder, or an earlier release (a checkpoint without trainer
    state)."""
    target = pathlib.Path(target)
    if not target.exists() and not target.is_symlink():
        return None
    if target.is_symlink() or not target.is_dir():
        return "is a file, not a directory"
    if steps_of(target) or (target / "trainer_state.pt").exists():
        return "holds a resumable run (a trainer state): exporting would delete it"
    if not any(target.iterdir()):
        return None
    try:
        config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if not (isinstance(config, dict) and config.get("trainer_state") is False):
        return ("is a non-empty directory that is not a release (an exported "
                "checkpoint, without trainer state): exporting would overwrite its "
                "files")
    return None


def export(source: str | pathlib.Path, target: str | pathlib.Path,
           overwrite: bool = False) -> pathlib.Path:
    """Write the checkpoint in `source` (a checkpoint, or a run folder: its newest
    sound checkpoint) as the folder `target`, without its trainer state: every
    other file as it is, and a config.json that still records the run's TrainArgs.
    `target` must be new, empty or an earlier release, unless `overwrite`; it is
    replaced at once, like a save. A file of `source` that is a symbolic link is
    refused. `load_checkpoint` reads the copy with trainer_state None. Returns
    `target`."""
    source, target = pathlib.Path(source), pathlib.Path(target)
    folder = load_checkpoint(source).path  # the whole checkpoint is sound
    if target.resolve() in (source.resolve(), folder.resolve()):
        raise ValueError(f"target ({target}) must differ from source ({source})")
    problem = export_problem(target)
    if problem and not overwrite:
        raise ValueError(f"target ({target}) {problem}; choose a new or empty "
                         "directory, or pass overwrite=True")
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name in ("trainer_state.pt", "config.json", MANIFEST):
            continue
        if path.is_symlink() or folder.resolve() not in path.resolve().parents:
            raise ValueError(f"{path} is a symbolic link: export copies only the "
                             "checkpoint's own files, never what a link points to")
        if path.is_file():
            files[path.name] = path.read_bytes()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["trainer_state"] = False
    files["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    _publish(files.items(), target, manifest=True, sync=True, replace=True)
    return target


__all__ = ["save_checkpoint", "save_step", "load_checkpoint", "load_weights",
           "export", "export_problem", "verify_manifest", "sha256", "steps_of",
           "flushed", "write_file",
           "Checkpoint", "FILES", "MANIFEST", "BOOK_CHECKPOINT"]
