"""The training helper: seeded and deterministic, its hooks run, its schedule is the documented one, and
bad settings or a diverging run stop with an error that says what to change. The command line: it trains,
saves, resumes bit for bit, explains its errors, and runs under torchrun with DDP."""
import argparse
import copy
import dataclasses
import errno
import json
import math
import os
import pathlib
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from dsv3_lite import checkpoint
from dsv3_lite.checkpoint import MANIFEST, load_checkpoint, steps_of, verify_manifest
from dsv3_lite.data import Corpus, Document
from dsv3_lite.train import _parser, _tokens, evaluate, lr_at, main, train_lm
from dsv3_lite.trainer import TrainArgs

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Bigram(nn.Module):
    def __init__(self, vocab=260):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, x):
        return self.table(x)


@pytest.fixture(scope="module")
def corpus():
    return Corpus([Document("text", "abcabcabd " * 20 + str(i)) for i in range(40)]
                  + [Document("code", "x = [i * i for i in range(9)]\n" * 8) for _ in range(10)])


def run(corpus, **kw):
    torch.manual_seed(0)
    model = Bigram()
    return model, train_lm(model, corpus, steps=30, batch_size=4, seq_len=16, lr=0.1, progress=False, **kw)


def test_training_is_deterministic_and_learns(corpus):
    m1, h1 = run(corpus, eval_every=10)
    m2, h2 = run(corpus, eval_every=10)
    assert h1.train_loss == h2.train_loss
    assert torch.equal(m1.table.weight, m2.table.weight)
    assert [s for s, _ in h1.val_loss] == [10, 20, 30]
    assert h1.final_val_loss < h1.val_loss[0][1] - 1 < math.log(260) - 1  # learns, far below guessing


def test_hooks_are_called(corpus):
    calls = []
    extra = []

    def loss_fn(model, x, y):
        extra.append(x.shape)
        return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    run(corpus, on_step=lambda model, step: calls.append(step), loss_fn=loss_fn)
    assert calls == list(range(30)) and extra[0] == (4, 16)


def test_evaluate_uses_fixed_windows_and_restores_mode(corpus):
    model = Bigram()
    model.train()
    a = evaluate(model, corpus, batch_size=2, seq_len=8, n_batches=3)
    assert model.training and a == evaluate(model, corpus, batch_size=2, seq_len=8, n_batches=3)


def test_evaluate_by_domain_matches_a_direct_count(corpus):
    """Per-domain losses recomputed here from the same windows, with log-softmax instead of cross_entropy."""
    torch.manual_seed(0)
    model = Bigram()
    overall, per_domain = evaluate(model, corpus, batch_size=3, seq_len=8, n_batches=4, by_domain=True)
    assert overall == evaluate(model, corpus, batch_size=3, seq_len=8, n_batches=4)
    generator = torch.Generator().manual_seed(1234)
    losses, labels = [], []
    for _ in range(4):
        x, y, domain = corpus.batch("val", 3, 8, generator, domains=True)
        with torch.no_grad():
            losses.append(-torch.log_softmax(model(x), -1).gather(-1, y[..., None]).squeeze(-1))
        labels.append(domain)
    losses, labels = torch.cat(losses).flatten(), torch.cat(labels).flatten()
    assert overall == pytest.approx(losses.mean().item(), rel=1e-6)
    assert sorted(per_domain) == sorted(corpus.domains) == ["code", "text"]
    for i, name in enumerate(corpus.domains):
        assert (labels == i).any()
        assert per_domain[name] == pytest.approx(losses[labels == i].mean().item(), rel=1e-6)


def test_schedule_warms_up_then_decays_to_a_tenth():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, 10) == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("setting,message", [
    (dict(steps=0), r"steps \(0\) must be >= 1"),
    (dict(steps=2.0), r"steps must be an int, got float"),
    (dict(batch_size=0), r"batch_size \(0\) must be >= 1"),
    (dict(seq_len=-4), r"seq_len \(-4\) must be >= 1"),
    (dict(eval_every=-1), r"eval_every \(-1\) must be >= 0"),
    (dict(eval_batches=0), r"eval_batches \(0\) must be >= 1"),
    (dict(lr=0.0), r"lr \(0.0\) must be a finite number > 0"),
    (dict(lr=float("nan")), r"lr \(nan\) must be a finite number > 0"),
    (dict(lr=float("inf")), r"lr \(inf\) must be a finite number > 0"),
    (dict(weight_decay=-0.1), r"weight_decay \(-0.1\) must be a finite number >= 0"),
    (dict(grad_clip=-1.0), r"grad_clip \(-1.0\) must be a finite number >= 0 \(0 switches clipping off"),
    (dict(grad_clip=None), r"grad_clip must be a number, got NoneType"),
    (dict(warmup=-1), r"warmup \(-1\) must be >= 0"),
    (dict(warmup=31), r"warmup \(31\) must be <= steps \(30\)"),
])
def test_bad_settings_raise_before_training(corpus, setting, message):
    model = Bigram()
    before = model.table.weight.clone()
    kwargs = dict(steps=30, batch_size=4, seq_len=16, progress=False) | setting
    with pytest.raises((ValueError, TypeError), match=message):
        train_lm(model, corpus, **kwargs)
    assert torch.equal(model.table.weight, before)


def test_zero_warmup_and_no_clipping_are_valid(corpus):
    _, history = run(corpus, warmup=0, grad_clip=0.0)
    assert history.final_val_loss < math.log(260) - 1


def test_a_loss_that_is_not_finite_stops_training(corpus):
    """A model must not keep training on NaN: a weight that is NaN or infinite before training is named (the
    learning rate is not the cause); a loss or gradient that overflows (as an FP16 run's can) is blamed on the
    run, and its step is not applied."""
    model = Bigram()
    with torch.no_grad():
        model.table.weight[:, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 1 of 30 \(the step is not applied\): the "
                                                 r"weight table.weight already holds NaN or infinite values"):
        train_lm(model, corpus, steps=30, batch_size=4, seq_len=16, progress=False)
    model = Bigram()
    model.table.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(FloatingPointError, match=r"gradient norm is (inf|nan) at step 1 of 30 .*diverged.*FP32 "
                                                 r"or BF16 instead of FP16"):
        train_lm(model, corpus, steps=30, batch_size=4, seq_len=16, progress=False)
    assert torch.isfinite(model.table.weight).all()
    calls = []

    def diverging(model, x, y):  # finite for two steps, then NaN: the error names the step
        calls.append(1)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        return loss * float("nan") if len(calls) == 3 else loss

    model = Bigram()
    with pytest.raises(FloatingPointError, match=r"at step 3 of 30"):
        train_lm(model, corpus, steps=30, batch_size=4, seq_len=16, loss_fn=diverging, progress=False)
    assert torch.isfinite(model.table.weight).all()  # the NaN step was not applied


def test_progress_bar_follows_tqdm_disable(corpus, monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    train_lm(Bigram(), corpus, steps=2, batch_size=2, seq_len=4)
    assert "training" in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    train_lm(Bigram(), corpus, steps=2, batch_size=2, seq_len=4)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("TQDM_DISABLE")
    train_lm(Bigram(), corpus, steps=2, batch_size=2, seq_len=4, progress=False)
    assert capsys.readouterr().err == ""


def test_bad_arguments(corpus):
    with pytest.raises(ValueError, match="must return logits"):
        evaluate(FlatModel(), corpus, batch_size=2, seq_len=4)
    with pytest.raises(ValueError, match=r"n_batches \(0\) must be >= 1"):
        evaluate(Bigram(), corpus, n_batches=0)


class FlatModel(nn.Module):
    def forward(self, x):
        return torch.zeros(x.numel(), 260)


# ------------------------------------------------------------------------------------------ the command line
# A small model and corpus: every run below takes a few seconds.
CLI = ["--docs-per-domain", "8", "--vocab_size", "300", "--dim", "32", "--inter_dim", "64", "--moe_inter_dim", "16",
       "--n_layers", "2", "--n_heads", "2", "--q_lora_rank", "16", "--kv_lora_rank", "16", "--qk_nope_head_dim", "8",
       "--qk_rope_head_dim", "8", "--v_head_dim", "8", "--steps", "8", "--seq_len", "32", "--batch_size", "4",
       "--batch_size_start", "2", "--batch_warmup", "0.3", "--warmup_steps", "2", "--eval_batches", "2"]


def history_of(out):
    return json.loads((out / "history.json").read_text())


def newest(out):
    """The folder of the run's newest checkpoint."""
    return steps_of(out)[-1]


def files_of(folder):
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_command_line_trains_saves_and_resumes_bit_for_bit(tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    main(["--out", str(whole), "--seed", "1", *CLI])
    printed = capsys.readouterr().out
    assert f"checkpoint at step 8: {whole / 'step-00000008'} (model.safetensors, config.json, tokenizer.json" \
        in printed
    assert re.search(r"step 8: validation loss \d\.\d+ nats/token \(english ", printed)
    assert sorted(p.name for p in whole.iterdir()) == ["history.json", "step-00000008"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt", MANIFEST} == \
        {p.name for p in newest(whole).iterdir()}
    assert json.loads((newest(whole) / "config.json").read_text())["model"]["dim"] == 32
    main(["--out", str(split), "--seed", "1", *CLI, "--stop-at", "3"])
    assert len(history_of(split)["train_loss"]) == 3
    main(["--out", str(split), "--resume"])
    assert f"resuming {split} from step-00000003 (step 3 of 8)" in capsys.readouterr().out
    assert history_of(split)["train_loss"] == history_of(whole)["train_loss"]
    assert history_of(split)["val_loss"] == history_of(whole)["val_loss"]
    assert same_checkpoint(split, whole)


def same_checkpoint(a, b):
    """Whether two runs end on the same step with the same weights, config and tokenizer, byte for byte (the
    trainer state differs only by the recorded speeds)."""
    return newest(a).name == newest(b).name and all(
        (newest(a) / name).read_bytes() == (newest(b) / name).read_bytes()
        for name in ("model.safetensors", "config.json", "tokenizer.json"))


def test_command_line_exports_an_inference_copy_at_the_end(tmp_path, capsys):
    run, copy = tmp_path / "run", tmp_path / "copy"
    main(["--out", str(run), *CLI, "--steps", "4", "--stop-at", "2", "--export", str(copy)])
    assert not copy.exists()  # an unfinished run is not exported, and says so
    assert "not exported" in capsys.readouterr().out
    main(["--out", str(run), "--resume", "--export", str(copy)])
    assert f"for inference, without the trainer state: {copy}" in capsys.readouterr().out
    assert (copy / "model.safetensors").read_bytes() == (newest(run) / "model.safetensors").read_bytes()
    assert not (copy / "trainer_state.pt").exists()
    with pytest.raises(SystemExit):
        main(["--out", str(copy), "--resume"])
    assert "holds no trainer state to resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "new"), *CLI, "--export", str(tmp_path / "new")])
    assert "must differ from --out" in capsys.readouterr().err


def test_command_line_errors(tmp_path, capsys):
    out = tmp_path / "run"
    main(["--out", str(out), *CLI, "--steps", "2"])
    capsys.readouterr()
    for argv, message in [
            (["--out", str(out), *CLI], "already holds a checkpoint: add --resume"),
            (["--out", str(out), "--resume", "--lr", "0.1"], r"--lr 0.1 \(saved: 0.003\): a resumed run keeps"),
            (["--out", str(tmp_path / "none"), "--resume"], "is not a dsv3_lite checkpoint"),
            (["--out", str(tmp_path / "new"), "--n_activated_experts", "9"], r"n_activated_experts \(9\) must be"),
            (["--out", str(tmp_path / "new"), "--precision", "fp16"], r"precision \('fp16'\)"),
            (["--out", str(tmp_path / "new"), "--save-every", "-1"], r"--save-every \(-1\) must be >= 0"),
            (["--out", str(tmp_path / "new"), "--threads", "0"], r"--threads \(0\) must be >= 1"),
            (["--out", str(tmp_path / "new"), "--keep", "0"], r"--keep \(0\) must be >= 1"),
            (["--out", str(out), "--resume", "--preset", "small"], r"--preset small \(saved: tiny\): a resumed"),
            (["--out", str(out), "--resume", "--route_scale", "2.0"], r"--route_scale 2.0 \(saved: 1.0\)"),
            (["--out", str(out), "--resume", "--seed", "5"], r"--seed 5 \(saved: 0\)")]:
        with pytest.raises(SystemExit):
            main(argv)
        assert re.search(message, capsys.readouterr().err), argv
    assert not (tmp_path / "new").exists()


def test_command_line_checks_its_input_before_the_first_step(tmp_path, capsys, monkeypatch):
    """Each of these used to end in a traceback, a hang (/dev/zero, one 3 MB word) or an error after the whole
    run had trained. Now each is a clear error before the first step, and nothing is saved."""
    texts = {"empty": b"", "nul": b"\0" * 1000, "few": b"one\n\ntwo\n\nthree\n",
             "short": "\n\n".join(f"note {i}" for i in range(30)).encode(),
             "big": b"word " * 300_000}
    for name, data in texts.items():
        (tmp_path / f"{name}.txt").write_bytes(data)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("not a folder")
    new = str(tmp_path / "new")
    cases = [
        (["--text", str(tmp_path / "folder")], r"folder is a directory: give a text file"),
        (["--text", str(tmp_path / "missing.txt")], r"missing.txt: no such file"),
        (["--text", str(tmp_path / "empty.txt")], r"holds 0 documents, and training needs at least 10 .*a "
                                                  r"document is a paragraph, and paragraphs are separated by a blank"),
        (["--text", str(tmp_path / "few.txt")], r"holds 3 documents, and training needs at least 10"),
        (["--text", str(tmp_path / "nul.txt")], r"nul.txt holds NUL bytes \(the first at byte 0\): a binary file"),
        (["--text", str(tmp_path / "big.txt"), "--text-limit", "1"], r"big.txt has 1,500,000 bytes, more than "
                                                                     r"the limit of 1,048,576"),
        (["--text", str(tmp_path / "short.txt")], r"seq_len \(32\) must be < the corpus' val split \(\d+ tokens\)"),
        (["--text-limit", "0"], r"--text-limit \(0\) must be >= 1"),
        (["--threads", str(10**6)], r"--threads \(1000000\) must be <= 4 x this machine's \d+ cores"),
        (["--vocab_size", str(10**9)], r"this ModelArgs \(dim 32, n_layers 2, vocab_size 1,000,000,000, .*\) has "
                                        r"[\d,]+ parameters"),  # before the tokenizer tries to learn 10**9 tokens
        (["--docs-per-domain", "1"], r"--docs-per-domain 1 makes 4 documents, and training needs at least 10"),
    ]
    if os.path.exists("/dev/zero"):
        cases.append((["--text", "/dev/zero"], r"/dev/zero is not a regular file \(a device or a pipe\?\)"))
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], r"--device cuda: torch sees no CUDA GPU here"))
    for argv, message in cases:
        with pytest.raises(SystemExit):
            main(["--out", new, *CLI, *argv])
        assert re.search(message, capsys.readouterr().err), argv
        assert not steps_of(new), argv
    for out in ("", "."):  # the current folder: --overwrite would delete it
        with pytest.raises(SystemExit):
            main(["--out", out, *CLI])
        assert re.search(r"--out \('\.'\) must name a run folder, not the current one", capsys.readouterr().err)
    with pytest.raises(SystemExit):  # --out under a file
        main(["--out", str(tmp_path / "file" / "run"), *CLI])
    assert re.search(r"file/run: cannot save checkpoints there \(Not a directory\); choose a writable folder",
                     capsys.readouterr().err)

    def read_only(self, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(pathlib.Path, "write_bytes", read_only)
    trained = []
    monkeypatch.setattr("dsv3_lite.trainer.Trainer.train_step", lambda self: trained.append(1))
    with pytest.raises(SystemExit):  # a read-only --out: refused before the first step
        main(["--out", new, *CLI])
    assert "cannot save checkpoints there (Read-only file system)" in capsys.readouterr().err
    assert not trained


def test_command_line_never_replaces_what_it_did_not_create(tmp_path, capsys):
    """A new run wants a new or empty --out (--overwrite replaces one); a run stopped before its first save, or
    a checkpoint without a manifest (an older dsv3_lite's), is not resumed."""
    notes, legacy, unfinished = tmp_path / "notes", tmp_path / "legacy", tmp_path / "unfinished"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    main(["--out", str(legacy), *CLI, "--steps", "2"])
    step = steps_of(legacy)[-1]
    (step / MANIFEST).unlink()
    for path in step.iterdir():
        path.rename(legacy / path.name)
    step.rmdir()
    (unfinished / ".step-00000001.tmp-12345").mkdir(parents=True)  # a first save, killed
    capsys.readouterr()
    for argv, message in [
            (["--out", str(notes), *CLI], r"notes exists and is not an empty folder: choose another --out, or add "
                                          r"--overwrite"),
            (["--out", str(legacy), "--resume"], r"is a single-folder checkpoint without a manifest.json \(from an "
                                                 r"older dsv3_lite\): it cannot be verified"),
            (["--out", str(unfinished), "--resume"], r"holds no complete checkpoint to resume \(was the run stopped "
                                                     r"before its first save\?\)")]:
        with pytest.raises(SystemExit):
            main(argv)
        assert re.search(message, capsys.readouterr().err), argv
    assert (notes / "todo.txt").read_text() == "keep me"
    main(["--out", str(unfinished), *CLI, "--steps", "2", "--overwrite"])
    assert sorted(p.name for p in unfinished.iterdir()) == ["history.json", "step-00000002"]


def test_command_line_keeps_the_newest_checkpoints(tmp_path):
    main(["--out", str(tmp_path / "two"), *CLI, "--steps", "4", "--save-every", "1"])
    assert [p.name for p in steps_of(tmp_path / "two")] == ["step-00000003", "step-00000004"]
    main(["--out", str(tmp_path / "one"), *CLI, "--steps", "4", "--save-every", "1", "--keep", "1"])
    assert [p.name for p in steps_of(tmp_path / "one")] == ["step-00000004"]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """The uninterrupted run the interrupted ones below must reproduce."""
    out = tmp_path_factory.mktemp("whole") / "run"
    main(["--out", str(out), *CLI])
    return out


def test_command_line_resumes_from_the_newest_sound_checkpoint(whole_run, tmp_path, capsys):
    out = tmp_path / "run"
    main(["--out", str(out), *CLI, "--save-every", "1", "--stop-at", "5"])
    state = newest(out) / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x10  # a flipped bit in the newest checkpoint
    state.write_bytes(bytes(data))
    capsys.readouterr()
    main(["--out", str(out), "--resume"])
    printed = capsys.readouterr().out
    assert re.search(r"step-00000005 skipped: .*step-00000005/trainer_state.pt does not match its SHA-256 hash",
                     printed)
    assert f"resuming {out} from step-00000004 (step 4 of 8)" in printed
    assert same_checkpoint(out, whole_run)
    assert history_of(out)["train_loss"] == history_of(whole_run)["train_loss"]


def test_a_trainer_state_edited_with_its_manifest_is_still_refused(whole_run, tmp_path, capsys):
    """An edit that also re-hashes the manifest passes the hashes; the state's own checks still name the file
    and what is wrong, instead of blaming --steps or failing inside torch."""
    out = tmp_path / "run"
    shutil.copytree(whole_run, out)
    folder = steps_of(out)[-1]
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    for edit, message in [
            (lambda s: s.update(step=100), r"trainer_state.pt is at step 100, beyond the run's 8 steps: it is "
                                           r"corrupt or was edited"),
            (lambda s: s["rng"].update(torch=torch.zeros(7, dtype=torch.uint8)),
             r"trainer_state.pt: the trainer state's random number generator states are corrupt or were edited")]:
        edited = copy.deepcopy(state)
        edit(edited)
        torch.save(edited, folder / "trainer_state.pt")
        manifest = json.loads((folder / MANIFEST).read_text())
        path = folder / "trainer_state.pt"
        manifest["files"]["trainer_state.pt"] = {"bytes": path.stat().st_size, "sha256": checkpoint.sha256(path)}
        (folder / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(SystemExit):
            main(["--out", str(out), "--resume"])
        assert re.search(message, capsys.readouterr().err)


def test_command_line_says_when_the_disk_is_full(whole_run, tmp_path, monkeypatch):
    """A write that fails with ENOSPC (simulated) stops the run with a message that says the disk is full and
    names the checkpoint; the previous checkpoint is intact and resumes to the uninterrupted run."""
    out = tmp_path / "run"
    write = checkpoint._write_bytes

    def full_at_step_5(path, data, sync):
        if path.parent.name.startswith(".step-00000005.") and path.name == "trainer_state.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, data, sync)

    monkeypatch.setattr(checkpoint, "_write_bytes", full_at_step_5)
    with pytest.raises(SystemExit) as stopped:
        main(["--out", str(out), *CLI, "--save-every", "1"])
    assert str(stopped.value.code).startswith(f"error: [Errno {errno.ENOSPC}] the disk is full: the checkpoint "
                                              f"{out / 'step-00000005'} was not saved")
    assert [p.name for p in sorted(out.iterdir())] == ["history.json", "step-00000003", "step-00000004"]
    monkeypatch.setattr(checkpoint, "_write_bytes", write)
    main(["--out", str(out), "--resume"])
    assert same_checkpoint(out, whole_run)


@pytest.mark.slow
def test_command_line_survives_kill_9_during_saves(whole_run, tmp_path):
    """SIGKILL the training command line while it saves (--save-every 1), at seeded offsets of 0-10 ms after a
    chosen step's save began, then resume it: every step folder left is complete and consistent (its files
    match the manifest, its trainer state is of its step), and the resumed runs end bit for bit on the
    uninterrupted run. Each resume is itself killed at a later step, so the chain crosses several kills."""
    rng = random.Random(0)
    out = tmp_path / "run"
    threads = ["--threads", str(torch.get_num_threads())]  # the same arithmetic as this process's runs
    argv = ["--out", str(out), *CLI, "--save-every", "1", *threads]
    for target in sorted(rng.sample(range(2, 8), 3)):
        process = subprocess.Popen([sys.executable, "-m", "dsv3_lite.train", *argv], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        saving = re.compile(rf"\.?step-{target:08d}(\.tmp-\d+)?")
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if out.is_dir() and any(saving.fullmatch(name) for name in os.listdir(out)):
                break
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.010))
        process.kill()
        process.wait()
        for folder in steps_of(out):
            verify_manifest(folder)
            assert load_checkpoint(folder).trainer_state["step"] == int(folder.name[5:]), folder
        argv = ["--out", str(out), "--resume", "--save-every", "1", *threads]
    main(["--out", str(out), "--resume", "--save-every", "1"])
    assert same_checkpoint(out, whole_run)
    assert history_of(out)["train_loss"] == history_of(whole_run)["train_loss"]


def test_command_line_extends_a_finished_run(tmp_path, capsys):
    """Breakpoints given in tokens are stored as TrainArgs.in_tokens places them; --resume --steps N then
    continues the finished run on the schedules of an N-step run; fewer steps than taken is an error."""
    out = tmp_path / "run"
    main(["--out", str(out), *CLI, "--steps", "5", "--decay_start_tokens", "0.5", "--mtp_switch_tokens", "100"])
    assert "warning" not in capsys.readouterr().err
    saved = json.loads((newest(out) / "config.json").read_text())["train"]
    given = TrainArgs(**{**saved, "decay_start": TrainArgs.decay_start, "mtp_switch": TrainArgs.mtp_switch})
    assert saved == dataclasses.asdict(given.in_tokens(decay_start=0.5, mtp_switch=100))
    main(["--out", str(out), "--resume", "--steps", "8"])
    assert "extended from 5 to 8 steps: from step 6 on, the schedules are those of a run of 8 steps" \
        in capsys.readouterr().out
    longer = TrainArgs(**saved).replace(steps=8)
    history = history_of(out)
    assert history["lr"][5:] == [longer.lr_at(s) for s in range(5, 8)]
    assert history["batch_size"][5:] == [longer.batch_size_at(s) for s in range(5, 8)]
    assert [step for step, _ in history["val_loss"]] == [5, 8]
    assert json.loads((newest(out) / "config.json").read_text())["train"] == dataclasses.asdict(longer)
    for argv, message in [
            (["--resume"], r"is complete \(step 8 of 8\): nothing to resume; a larger --steps extends it"),
            (["--resume", "--steps", "6"], rf"--steps \(6\) must be >= the 8 steps the run in {out} has taken"),
            (["--resume", "--steps", "9", "--decay_start_tokens", "0.3"],
             "--decay_start_tokens: a resumed run keeps the breakpoints it was saved with")]:
        with pytest.raises(SystemExit):
            main(["--out", str(out), *argv])
        assert re.search(message, capsys.readouterr().err), argv


def test_command_line_exports_a_release_without_training(tmp_path, capsys):
    run, release = tmp_path / "run", tmp_path / "release"
    main(["--out", str(run), *CLI, "--steps", "2", "--warmup_steps", "3"])
    err = capsys.readouterr().err
    assert err.count("warning: --warmup_steps (3) is longer than the run (2 steps): the learning rate warms up "
                     "over all 2 steps") == 1
    files = files_of(run)
    main(["--out", str(run), "--export-only", str(release)])
    assert f"exported {run} (step 2 of 2) without its trainer state, for inference: {release}" \
        in capsys.readouterr().out
    assert files_of(run) == files  # nothing trained, nothing saved
    assert (release / "model.safetensors").read_bytes() == files["step-00000002/model.safetensors"]
    assert not (release / "trainer_state.pt").exists() and load_checkpoint(release).trainer_state is None
    main(["--out", str(run), "--export-only", str(release)])  # a release may be exported over
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    for argv, message in [
            (["--out", str(release), "--export-only", str(run)],
             rf"--export-only \({run}\) holds a resumable run \(a trainer state\): exporting would delete it"),
            (["--out", str(tmp_path / "new"), *CLI, "--export", str(run)],
             rf"--export \({run}\) holds a resumable run"),
            (["--out", str(run), "--export-only", str(tmp_path / "notes")],
             r"--export-only \(.*notes\) is a non-empty directory that is not a release"),
            (["--out", str(run), "--export-only", str(run)], "must differ from --out"),
            (["--out", str(run), "--export-only", str(release), "--lr", "0.1", "--resume"],
             "--export-only trains nothing: drop --resume, --lr"),
            (["--out", str(tmp_path / "none"), "--export-only", str(release)], "is not a dsv3_lite checkpoint")]:
        with pytest.raises(SystemExit):
            main(argv)
        assert re.search(message, capsys.readouterr().err), argv
    assert files_of(run) == files  # a run is never exported over
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me" and not (tmp_path / "new").exists()


@pytest.mark.parametrize("text,value", [("469B", 469 * 10**9), ("14.633T", 14_633 * 10**9), ("300K", 300_000),
                                        ("2.5m", 2_500_000), ("50000", 50_000), ("1", 1), ("0.676", 0.676),
                                        ("1.0", 1.0), ("0", 0)])
def test_token_values_are_counts_or_fractions(text, value):
    parsed = _tokens(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("argv,message", [
    (["--decay_start_tokens", "3e5"], r"argument --decay_start_tokens: '3e5' is neither a fraction of the run's"),
    (["--gamma_off_tokens", "1.5"], r"argument --gamma_off_tokens: '1.5' is neither"),
    (["--mtp_switch_tokens=-2K"], r"argument --mtp_switch_tokens: '-2K' is neither"),
    (["--final_start_tokens", "10X"], r"argument --final_start_tokens: '10X' is neither"),
    (["--decay_start_tokens", "0.5", "--decay_start", "0.3"], "--decay_start and --decay_start_tokens set the same"),
    (["--mtp_switch_tokens", "1T"], r"--mtp_switch_tokens: mtp_switch \(1,000,000,000,000 tokens\) must be <= "
                                    r"the run's [\d,]+ tokens"),
    (["--decay_start_tokens", "0.9", "--decay_end_tokens", "0.5"], r"fall out of order"),
])
def test_command_line_rejects_bad_token_breakpoints(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run"), *CLI, *argv])
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def documented_commands():
    """Every `python -m dsv3_lite.train` / `torchrun ... -m dsv3_lite.train` command in a code block of the
    README, the book's pages and the chapters (continued lines joined; '...' elisions left out)."""
    texts = [(p.name, p.read_text(encoding="utf-8")) for p in [ROOT / "README.md", *(ROOT / "book").glob("*.md")]]
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        texts += [(path.name, "".join(c["source"])) for c in cells if c["cell_type"] == "markdown"]
    for name, text in texts:
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                command = re.search(r"-m dsv3_lite\.train (.*)", line)
                if command and "..." not in line:
                    yield name, command.group(1).split(" #")[0]


def test_documented_commands_parse(monkeypatch):
    commands = list(documented_commands())
    assert len(commands) >= 8 and any("--export-only" in c for _, c in commands)
    parser = _parser()
    monkeypatch.setattr(parser, "error", lambda message: pytest.fail(message))
    for name, command in commands:
        assert isinstance(parser.parse_args(shlex.split(command)), argparse.Namespace), (name, command)


def test_command_line_trains_on_a_text_file(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Note {i}: the tide was {'high' if i % 2 else 'low'} at {i} o'clock. 潮水。"
                                for i in range(60)), encoding="utf-8")
    main(["--out", str(tmp_path / "run"), "--text", str(text), *CLI[2:], "--steps", "2", "--fim_rate", "0.0",
          "--stop-at", "1"])
    assert "domains=('text',)" in capsys.readouterr().out
    original = text.read_bytes()
    text.write_bytes(original.replace(b"tide", b"Tide"))
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run"), "--resume"])
    assert re.search(r"--text .*notes.txt: the file changed since the run started \(its SHA-256 hash differs",
                     capsys.readouterr().err)
    text.write_bytes(original)
    main(["--out", str(tmp_path / "run"), "--resume"])
    assert "resuming" in capsys.readouterr().out


def run_to_completion(command, seconds):
    """Run `command`; kill it and its children and fail if it takes longer than `seconds` (a hang)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, cwd=ROOT)
    try:
        output, _ = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"{' '.join(command)} did not finish in {seconds} s:\n{process.communicate()[0]}")
    assert process.returncode == 0, output
    return output


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) vs 1 process, same global batch: each process takes half of every
    batch and DDP averages the gradients, so only the order of floating-point sums differs. Tolerance: 1e-4
    relative on every step's loss (measured: about 2e-7 over these 8 steps, 2e-5 over 40 steps at a higher
    learning rate); a real fault (a process training on the wrong rows, gradients summed instead of averaged,
    biases moved by local loads) moves the losses by far more. The balance biases must stay identical across
    the processes: the expert loads are summed over them before each bias update."""
    one, two = tmp_path / "one", tmp_path / "two"
    main(["--out", str(one), *CLI])
    output = run_to_completion([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                "2", "-m", "dsv3_lite.train", "--out", str(two), *CLI], seconds=240)
    assert "2 processes" in output and "balance biases identical on all 2 processes: True" in output
    a, b = history_of(one), history_of(two)
    assert a["batch_size"] == b["batch_size"] == [2, 2, 4, 4, 4, 4, 4, 4]
    for name in ("train_loss", "main_loss", "mtp_loss", "max_violation"):
        assert b[name] == pytest.approx(a[name], rel=1e-4), name
    assert b["val_loss"][-1][1] == pytest.approx(a["val_loss"][-1][1], rel=1e-4)
