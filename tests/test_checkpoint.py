"""Checkpoints: weights in safetensors (shared tensors stored once), config, tokenizer and trainer state
round-trip exactly; a truncated file, a missing or extra tensor, or a model of another shape is an error that
says so, and nothing is loaded half. A save is complete or absent (a full disk leaves the previous checkpoint),
a manifest of SHA-256 hashes catches any changed byte, a run folder loads its newest sound checkpoint, and
export never destroys a run, a folder it does not own, or follows a link out of the checkpoint."""
import errno
import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3_lite import ModelArgs
from dsv3_lite import checkpoint
from dsv3_lite.checkpoint import (BOOK_CHECKPOINT, FILES, MANIFEST, export, load_checkpoint, load_weights,
                                  flushed, save_checkpoint, save_step, steps_of, verify_manifest)
from dsv3_lite.data import Corpus, build_documents
from dsv3_lite.model import Transformer
from dsv3_lite.tokenizer import BPETokenizer
from dsv3_lite.trainer import Trainer, TrainArgs
from tests.models import SMALL



@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train((d.text for d in build_documents(20)), vocab_size=300)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    """A checkpoint after two training steps."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.tiny(vocab_size=tok.vocab_size, **SMALL))
    corpus = Corpus(build_documents(4), val_every=4, tokenizer=tok, fim_rate=0.1)
    trainer = Trainer(model, corpus, TrainArgs(steps=4, seq_len=32, batch_size=4, batch_size_start=4,
                                               warmup_steps=1, eval_batches=1), progress=False)
    trainer.train(until=2)
    directory = save_checkpoint(tmp_path_factory.mktemp("ckpt"), model, tok, trainer, {"docs_per_domain": 4})
    return directory, model, trainer


def test_everything_round_trips(saved, tok):
    directory, model, trainer = saved
    assert sorted(p.name for p in directory.iterdir()) == sorted([*FILES, MANIFEST])
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}.")]  # no leftover
    listed = json.loads((directory / MANIFEST).read_text())["files"]
    assert listed == {name: {"bytes": (directory / name).stat().st_size, "sha256": checkpoint.sha256(directory / name)}
                      for name in FILES}
    loaded = load_checkpoint(directory)
    assert loaded.model.args == model.args and loaded.model.training
    for (name, p), q in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert loaded.model.mtp[0].embed.weight is loaded.model.embed.weight  # still shared
    assert loaded.tokenizer.tokenizer.to_str() == tok.tokenizer.to_str()
    assert loaded.train_args == trainer.args and loaded.data == {"docs_per_domain": 4}
    state = loaded.trainer_state
    assert (state["step"], state["position"]) == (2, 8) and state["history"]["train_loss"] == \
        trainer.history.train_loss
    assert torch.equal(state["rng"]["torch"], trainer.state_dict()["rng"]["torch"])


def test_shared_tensors_are_stored_once(saved):
    directory, model, _ = saved
    names = set(load_file(str(directory / "model.safetensors")))
    assert "embed.weight" in names and "head.weight" in names
    assert not any(n.startswith("mtp.0.embed.") or n.startswith("mtp.0.head.") for n in names)
    assert len(names) == len({p.data_ptr() for p in model.state_dict().values()})


def test_loading_draws_no_random_numbers(saved):
    state = torch.get_rng_state()
    load_checkpoint(saved[0])
    assert torch.equal(torch.get_rng_state(), state)


def test_a_model_without_trainer(tok, tmp_path):
    model = Transformer(ModelArgs.tiny(vocab_size=tok.vocab_size, **SMALL))
    save_checkpoint(tmp_path, model, tok)
    loaded = load_checkpoint(tmp_path)
    assert loaded.train_args is None and loaded.trainer_state is None


def test_an_export_keeps_everything_but_the_trainer_state(saved, tmp_path):
    source = copy_checkpoint(saved, tmp_path / "source", manifest=False)
    (source / "history.json").write_text("{}")  # any other file of the run travels too
    target = export(source, tmp_path / "copy")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "history.json", "manifest.json",
                                                        "model.safetensors", "tokenizer.json"]
    loaded, original = load_checkpoint(target), load_checkpoint(saved[0])
    assert loaded.trainer_state is None and loaded.train_args == original.train_args
    assert loaded.data == original.data
    for (name, a), b in zip(loaded.model.state_dict().items(), original.model.state_dict().values()):
        assert torch.equal(a, b), name
    export(source, target)  # an earlier release is replaced
    (target / "trainer_state.pt").write_bytes(b"stale")  # now it looks resumable: refused unless told
    with pytest.raises(ValueError, match=r"holds a resumable run \(a trainer state\): exporting would delete it"):
        export(source, target)
    assert (target / "trainer_state.pt").read_bytes() == b"stale"
    export(source, target, overwrite=True)
    assert not (target / "trainer_state.pt").exists()
    with pytest.raises(ValueError, match="must differ from source"):
        export(source, source)
    with pytest.raises(FileNotFoundError, match="is not a dsv3_lite checkpoint"):
        export(tmp_path / "nothing", tmp_path / "copy2")


def copy_checkpoint(saved, tmp_path, manifest=False):
    """A copy of the saved checkpoint; without its manifest unless asked (then it loads unverified, and the
    checks below the manifest are what catch a damaged file)."""
    tmp_path.mkdir(exist_ok=True)
    for name in [*FILES, MANIFEST] if manifest else FILES:
        (tmp_path / name).write_bytes((saved[0] / name).read_bytes())
    return tmp_path


@pytest.mark.parametrize("name", FILES)
def test_the_manifest_catches_any_changed_byte(saved, tmp_path, name):
    path = copy_checkpoint(saved, tmp_path, manifest=True) / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{name} does not match its SHA-256 hash in manifest.json"):
        load_checkpoint(tmp_path)
    if name == "model.safetensors":  # a flipped bit in a weight loads without the manifest, silently
        assert load_checkpoint(tmp_path, verify=False).trainer_state["step"] == 2
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match=rf"{name} has [\d,]+ bytes, manifest.json records [\d,]+: truncated"):
        load_checkpoint(tmp_path)


def test_an_edited_config_or_a_swapped_tokenizer_is_refused(saved, tok, tmp_path):
    copy_checkpoint(saved, tmp_path, manifest=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["route_scale"] = 2.5
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    with pytest.raises(ValueError, match=r"config.json does not match its SHA-256 hash"):
        load_checkpoint(tmp_path)
    copy_checkpoint(saved, tmp_path, manifest=True)
    other = BPETokenizer.train((d.text for d in build_documents(21)), vocab_size=300)
    assert other.vocab_size == tok.vocab_size
    other.save(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=r"tokenizer.json (has|does not match)"):
        load_checkpoint(tmp_path)
    copy_checkpoint(saved, tmp_path, manifest=True)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["files"]["trainer_state.pt"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"trainer_state.pt is not in manifest.json"):
        load_checkpoint(tmp_path)


def test_a_save_goes_into_a_new_folder(saved, tok, tmp_path):
    _, model, trainer = saved
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"is not empty: a checkpoint is saved into a new or empty folder"):
        save_checkpoint(tmp_path, model, tok, trainer)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    save_checkpoint(tmp_path, model, tok, trainer, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*FILES, MANIFEST])
    save_checkpoint(tmp_path / "fast", model, tok, durable=False)  # no manifest: loads unverified
    assert not (tmp_path / "fast" / MANIFEST).exists() and load_checkpoint(tmp_path / "fast").trainer_state is None


def test_a_run_folder_keeps_its_newest_checkpoints_and_loads_the_newest_sound_one(saved, tok, tmp_path):
    _, model, trainer = saved
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        trainer.step = step
        save_step(run, model, tok, trainer, keep=2)
    trainer.step = 2
    flushed(run)
    assert [p.name for p in steps_of(run)] == ["step-00000003", "step-00000004"]
    assert load_checkpoint(run).path == run / "step-00000004" and load_checkpoint(run).skipped == ()
    manifest = run / "step-00000004" / MANIFEST  # a step folder whose manifest never reached the disk
    text = manifest.read_text()
    manifest.unlink()
    loaded = load_checkpoint(run)
    assert loaded.path == run / "step-00000003" and "step-00000004 has no manifest.json" in loaded.skipped[0]
    manifest.write_text(text)
    weights = run / "step-00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    loaded = load_checkpoint(run)
    assert loaded.path == run / "step-00000003" and loaded.trainer_state["step"] == 3
    assert len(loaded.skipped) == 1 and loaded.skipped[0].startswith("step-00000004 skipped: ") \
        and "truncated or changed" in loaded.skipped[0]
    save_step(run, model, tok, trainer, keep=3)  # resumed from an earlier step: the later folders go
    assert [p.name for p in steps_of(run)] == ["step-00000002"]
    (run / "step-00000002" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds no sound checkpoint: step-00000002 skipped: .*config.json"):
        load_checkpoint(run)
    with pytest.raises(ValueError, match=r"keep \(0\) must be >= 1"):
        save_step(run, model, tok, trainer, keep=0)


def test_older_checkpoints_are_removed_only_once_the_new_one_is_on_the_disk(saved, tok, tmp_path, monkeypatch):
    """save_step returns when the new step folder is complete; its flush to the disk runs in the background, and
    the folders it replaces stay until that flush is done (a power cut in between finds them). An error of the
    flush is raised by flushed() or the next save."""
    _, model, trainer = saved
    run = tmp_path / "run"
    trainer.step = 1
    save_step(run, model, tok, trainer, keep=1)
    flushed(run)
    release, sync = threading.Event(), checkpoint._sync_folder
    monkeypatch.setattr(checkpoint, "_sync_folder", lambda folder: (release.wait(30), sync(folder)))
    try:
        trainer.step = 2
        second = save_step(run, model, tok, trainer, keep=1)
        verify_manifest(second)  # complete and verified at once
        assert [p.name for p in steps_of(run)] == ["step-00000001", "step-00000002"]  # the flush has not run
        release.set()
        flushed(run)
        assert [p.name for p in steps_of(run)] == ["step-00000002"]

        def failing(folder):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        monkeypatch.setattr(checkpoint, "_sync_folder", failing)
        trainer.step = 3
        save_step(run, model, tok, trainer, keep=1)
        with pytest.raises(OSError, match=r"the checkpoint .*step-00000003 could not be flushed to the disk "
                                          r"\(Input/output error\); the older checkpoints are kept"):
            flushed(run)
        assert [p.name for p in steps_of(run)] == ["step-00000002", "step-00000003"]  # nothing removed
    finally:
        trainer.step = 2


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(saved, tok, tmp_path, monkeypatch):
    _, model, trainer = saved
    run = tmp_path / "run"
    first = save_step(run, model, tok, trainer)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    write = checkpoint._write_bytes

    def full(path, data, sync):
        if path.name == "trainer_state.pt":  # the disk fills half-way through the third file
            write(path, data[:len(data) // 2], sync)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, data, sync)

    monkeypatch.setattr(checkpoint, "_write_bytes", full)
    trainer.step = 3
    try:
        with pytest.raises(OSError, match=rf"the disk is full: the checkpoint {run / 'step-00000003'} was not "
                                          r"saved") as caught:
            save_step(run, model, tok, trainer)
    finally:
        trainer.step = 2
    assert caught.value.errno == errno.ENOSPC
    assert [p.name for p in run.iterdir()] == [first.name]  # nothing half-written left
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert load_checkpoint(run).path == first


def test_export_refuses_to_destroy_a_run_or_a_folder_it_does_not_own(saved, tok, tmp_path):
    source = saved[0]
    run = tmp_path / "run"
    save_step(run, saved[1], tok, saved[2])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    single = copy_checkpoint(saved, tmp_path / "single")
    for target, message in [(run, "holds a resumable run"), (single, "holds a resumable run"),
                            (notes, "is a non-empty directory that is not a release"),
                            (notes / "todo.txt", "is a file, not a directory")]:
        with pytest.raises(ValueError, match=message):
            export(source, target)
    assert (notes / "todo.txt").read_text() == "keep me" and (single / "trainer_state.pt").exists()
    assert steps_of(run)
    release = export(run, tmp_path / "release")  # a run folder exports its newest checkpoint
    assert load_checkpoint(release).trainer_state is None
    export(source, notes, overwrite=True)
    assert not (notes / "todo.txt").exists() and load_checkpoint(notes).trainer_state is None


def test_export_does_not_follow_links_out_of_the_checkpoint(saved, tmp_path):
    source = copy_checkpoint(saved, tmp_path / "source")
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the checkpoint")
    (source / "notes.txt").symlink_to(secret)
    with pytest.raises(ValueError, match=r"notes.txt is a symbolic link: export copies only the checkpoint's"):
        export(source, tmp_path / "release")
    assert not (tmp_path / "release").exists()
    (source / "notes.txt").unlink()
    (source / "model.safetensors").unlink()
    (source / "model.safetensors").symlink_to(saved[0] / "model.safetensors")
    copy_checkpoint(saved, tmp_path / "checked", manifest=True)
    (tmp_path / "checked" / "tokenizer.json").unlink()
    (tmp_path / "checked" / "tokenizer.json").symlink_to(saved[0] / "tokenizer.json")
    with pytest.raises(ValueError, match=r"tokenizer.json is missing or not a plain file"):
        load_checkpoint(tmp_path / "checked")
    with pytest.raises(ValueError, match=r"model.safetensors is a symbolic link"):
        export(source, tmp_path / "release")


def test_the_book_checkpoint_still_loads():
    """A checkpoint of the single-folder layout without a manifest (the one the package ships) loads."""
    loaded = load_checkpoint(BOOK_CHECKPOINT)
    assert loaded.path == BOOK_CHECKPOINT and loaded.trainer_state is None


def test_truncated_weights(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model.safetensors is truncated or corrupt"):
        load_checkpoint(tmp_path)


def test_truncated_trainer_state(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path) / "trainer_state.pt"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"trainer_state.pt is truncated or corrupt"):
        load_checkpoint(tmp_path)


def test_truncated_config_and_tokenizer(saved, tmp_path):
    copy_checkpoint(saved, tmp_path)
    config = tmp_path / "config.json"
    config.write_text(config.read_text()[:100])
    with pytest.raises(ValueError, match=r"config.json is truncated or not JSON"):
        load_checkpoint(tmp_path)
    copy_checkpoint(saved, tmp_path)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:1000])
    with pytest.raises(ValueError, match=r"tokenizer.json is not a valid tokenizer.json"):
        load_checkpoint(tmp_path)


def test_a_device_that_is_not_one_is_named(saved):
    with pytest.raises(ValueError, match=r"device \('bogus'\) is not a torch device"):
        load_checkpoint(saved[0], device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device \(cuda\): torch sees no CUDA GPU here"):
            load_checkpoint(saved[0], device="cuda")


def test_a_config_without_a_model_field_is_refused(saved, tmp_path):
    """A ModelArgs field left out of config.json would fall back to its default (V3's full size) and the weights'
    shapes would be blamed; the missing field is named instead (also when the manifest is not checked)."""
    copy_checkpoint(saved, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model"]["dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json lacks the model fields dim: it must give every ModelArgs"):
        load_checkpoint(tmp_path, verify=False)


def test_missing_and_extra_tensors(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path) / "model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if k != "layers.1.ffn.gate.bias"}, str(path))
    with pytest.raises(ValueError, match=r"lacks tensors the model needs: layers.1.ffn.gate.bias"):
        load_checkpoint(tmp_path)
    save_file({**tensors, "extra.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"has tensors the model does not: extra.weight"):
        load_checkpoint(tmp_path)


def test_a_model_of_another_shape(saved, tok):
    other = Transformer(ModelArgs.tiny(vocab_size=tok.vocab_size, **{**SMALL, "dim": 48}))
    before = other.embed.weight.clone()
    with pytest.raises(ValueError, match=r"holds tensors of other shapes: embed.weight is \(300, 32\) in the file "
                                         r"but \(300, 48\) in the model.*\(and \d+ more\)"):
        load_weights(other, saved[0] / "model.safetensors")
    assert torch.equal(other.embed.weight, before)  # nothing loaded
    config = json.loads((saved[0] / "config.json").read_text())
    assert config["model"]["dim"] == 32


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a dsv3_lite checkpoint: model.safetensors, config.json, "
                                                r"tokenizer.json missing"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "model.safetensors")


def test_the_trainer_state_must_fit(saved, tok):
    directory, model, _ = saved
    state = load_checkpoint(directory).trainer_state
    other = Transformer(ModelArgs.tiny(vocab_size=tok.vocab_size, **{**SMALL, "n_layers": 3}))
    corpus = Corpus(build_documents(4), val_every=4, tokenizer=tok, fim_rate=0.1)
    trainer = Trainer(other, corpus, TrainArgs(steps=4, seq_len=32, batch_size=4, batch_size_start=4,
                                               warmup_steps=1))
    with pytest.raises(ValueError, match="the optimizer state does not fit this model's parameters"):
        trainer.load_state_dict(state)
    short = Trainer(model, corpus, TrainArgs(steps=1, seq_len=32, batch_size=4, batch_size_start=4,
                                             warmup_steps=1))
    with pytest.raises(ValueError, match=r"the trainer state is at step 2, outside this run's 0 .. 1 steps"):
        short.load_state_dict(state)
    same = Trainer(model, corpus, TrainArgs(steps=4, seq_len=32, batch_size=4, batch_size_start=4,
                                            warmup_steps=1))
    for position, error, message in [(-5, ValueError, r"position \(-5\) must be >= 0"),
                                     (10**12, ValueError, r"position \(1,000,000,000,000 sequences\) cannot follow "
                                                          r"2 steps of 4 to 4 sequences"),
                                     (7, ValueError, r"position \(7 sequences\) cannot follow"),
                                     (8.0, TypeError, r"position must be an int, got float")]:
        with pytest.raises(error, match=message):
            same.load_state_dict({**state, "position": position})
    same.load_state_dict(state)
    assert same.position == 8
