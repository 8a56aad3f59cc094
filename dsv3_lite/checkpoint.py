"""Checkpoints: everything a training run needs to continue, in one directory.

    model.safetensors   the weights (safetensors: tensors only, no pickled code,
                        each tensor stored once: the MTP modules' embedding and
                        head are the main model's)
    config.json         ModelArgs, TrainArgs and the data options, as JSON
    tokenizer.json      the tokenizer, in Hugging Face's format
    trainer_state.pt    optimizer moments, step, data position, RNG states and
                        history (`Trainer.state_dict`)

`export` copies a checkpoint without its trainer state (the optimizer's two moments
take twice the weights' size): what inference needs, and what the book ships.

Each file is written under a temporary name and then renamed, so no file is ever
left half written; the files are replaced one after another, so a save interrupted
between two of them leaves files of two different steps (save again before resuming).
Loading checks every file and every tensor: a
truncated file, a tensor missing, left over or of another shape is an error that
names it, never a partial load.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import pickle
import shutil
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dsv3_lite.config import ModelArgs
from dsv3_lite.model import Transformer
from dsv3_lite.tokenizer import BPETokenizer
from dsv3_lite.trainer import Trainer, TrainArgs

FILES = ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt")
# The book's trained checkpoint, shipped inside the package (chapter 8; the README
# gives the command that trains it)
BOOK_CHECKPOINT = pathlib.Path(__file__).with_name("checkpoints") / "tiny8"


class Checkpoint(NamedTuple):
    """A loaded checkpoint: the model (in training mode), its tokenizer, the run's
    TrainArgs, the trainer state for `Trainer.load_state_dict` (None if saved
    without a trainer, or `export`ed) and the data options given at saving."""

    model: Transformer
    tokenizer: BPETokenizer
    train_args: TrainArgs | None
    trainer_state: dict[str, Any] | None
    data: dict[str, Any]


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


def _write(path: pathlib.Path, write) -> None:
    """write(temporary path), then rename it to `path` in one step."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def save_checkpoint(directory: str | pathlib.Path, model: Transformer,
                    tokenizer: BPETokenizer, trainer: Trainer | None = None,
                    data: dict[str, Any] | None = None) -> pathlib.Path:
    """Save `model`, `tokenizer` and (if given) the trainer's state and TrainArgs
    into `directory` (created if needed); `data` records how the corpus was made,
    as JSON. Returns the directory."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, _ = _unique_state(model)
    _write(directory / "model.safetensors",
           lambda p: save_file({k: v.detach().cpu().contiguous()
                                for k, v in state.items()}, str(p)))
    config = {"model": dataclasses.asdict(model.args),
              "train": dataclasses.asdict(trainer.args) if trainer else None,
              "data": data or {}, "trainer_state": trainer is not None}
    _write(directory / "config.json",
           lambda p: p.write_text(json.dumps(config, indent=2) + "\n",
                                  encoding="utf-8"))
    _write(directory / "tokenizer.json", tokenizer.save)
    if trainer is not None:
        _write(directory / "trainer_state.pt",
               lambda p: torch.save(trainer.state_dict(), p))
    else:
        (directory / "trainer_state.pt").unlink(missing_ok=True)
    return directory


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


def load_checkpoint(directory: str | pathlib.Path,
                    device: torch.device | str = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`: the model is built from its
    config.json on `device`, without drawing random numbers (torch's random state
    stays as it was), and takes the saved weights."""
    directory = pathlib.Path(directory)
    absent = [f for f in FILES[:3] if not (directory / f).is_file()]
    if absent:
        raise FileNotFoundError(f"{directory} is not a dsv3_lite checkpoint: "
                                f"{', '.join(absent)} missing (a checkpoint holds "
                                f"{', '.join(FILES)})")
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
                      config["data"])


def export(source: str | pathlib.Path, target: str | pathlib.Path) -> pathlib.Path:
    """Copy the checkpoint in `source` into `target` (created if needed) without
    its trainer state: every other file as it is, and a config.json that still
    records the run's TrainArgs. `load_checkpoint` reads the copy with
    trainer_state None. Returns `target`."""
    source, target = pathlib.Path(source), pathlib.Path(target)
    load_checkpoint(source)  # the whole checkpoint is sound
    if target.resolve() == source.resolve():
        raise ValueError(f"target ({target}) must differ from source ({source})")
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in ("trainer_state.pt", "config.json"):
            _write(target / path.name, lambda p: shutil.copyfile(path, p))
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["trainer_state"] = False
    _write(target / "config.json",
           lambda p: p.write_text(json.dumps(config, indent=2) + "\n",
                                  encoding="utf-8"))
    (target / "trainer_state.pt").unlink(missing_ok=True)
    return target


__all__ = ["save_checkpoint", "load_checkpoint", "load_weights", "export",
           "Checkpoint", "FILES", "BOOK_CHECKPOINT"]
