"""Checkpoints: weights in safetensors (shared tensors stored once), config, tokenizer and trainer state
round-trip exactly; a truncated file, a missing or extra tensor, or a model of another shape is an error that
says so, and nothing is loaded half."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3_lite import ModelArgs
from dsv3_lite.checkpoint import FILES, export, load_checkpoint, load_weights, save_checkpoint
from dsv3_lite.data import Corpus, build_documents
from dsv3_lite.model import Transformer
from dsv3_lite.tokenizer import BPETokenizer
from dsv3_lite.trainer import Trainer, TrainArgs

SHAPE = dict(dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_heads=2, q_lora_rank=16, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=64)


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train((d.text for d in build_documents(20)), vocab_size=300)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    """A checkpoint after two training steps."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.tiny(vocab_size=tok.vocab_size, **SHAPE))
    corpus = Corpus(build_documents(4), val_every=4, tokenizer=tok, fim_rate=0.1)
    trainer = Trainer(model, corpus, TrainArgs(steps=4, seq_len=32, batch_size=4, batch_size_start=4,
                                               warmup_steps=1, eval_batches=1), progress=False)
    trainer.train(until=2)
    directory = save_checkpoint(tmp_path_factory.mktemp("ckpt"), model, tok, trainer, {"docs_per_domain": 4})
    return directory, model, trainer


def test_everything_round_trips(saved, tok):
    directory, model, trainer = saved
    assert sorted(p.name for p in directory.iterdir()) == sorted(FILES)  # no temporary file left
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
    model = Transformer(ModelArgs.tiny(vocab_size=tok.vocab_size, **SHAPE))
    save_checkpoint(tmp_path, model, tok)
    loaded = load_checkpoint(tmp_path)
    assert loaded.train_args is None and loaded.trainer_state is None


def test_an_export_keeps_everything_but_the_trainer_state(saved, tmp_path):
    source = copy_checkpoint(saved, tmp_path)
    (source / "history.json").write_text("{}")  # any other file of the run travels too
    target = export(source, tmp_path / "copy")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "history.json", "model.safetensors",
                                                        "tokenizer.json"]
    loaded, original = load_checkpoint(target), load_checkpoint(saved[0])
    assert loaded.trainer_state is None and loaded.train_args == original.train_args
    assert loaded.data == original.data
    for (name, a), b in zip(loaded.model.state_dict().items(), original.model.state_dict().values()):
        assert torch.equal(a, b), name
    (target / "trainer_state.pt").write_bytes(b"stale")  # a second export over the first removes it
    export(source, target)
    assert not (target / "trainer_state.pt").exists()
    with pytest.raises(ValueError, match="must differ from source"):
        export(source, source)
    with pytest.raises(FileNotFoundError, match="is not a dsv3_lite checkpoint"):
        export(tmp_path / "nothing", tmp_path / "copy2")


def copy_checkpoint(saved, tmp_path):
    for name in FILES:
        (tmp_path / name).write_bytes((saved[0] / name).read_bytes())
    return tmp_path


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
    other = Transformer(ModelArgs.tiny(vocab_size=tok.vocab_size, **{**SHAPE, "dim": 48}))
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
    other = Transformer(ModelArgs.tiny(vocab_size=tok.vocab_size, **{**SHAPE, "n_layers": 3}))
    corpus = Corpus(build_documents(4), val_every=4, tokenizer=tok, fim_rate=0.1)
    trainer = Trainer(other, corpus, TrainArgs(steps=4, seq_len=32, batch_size=4, batch_size_start=4,
                                               warmup_steps=1))
    with pytest.raises(ValueError, match="the optimizer state does not fit this model's parameters"):
        trainer.load_state_dict(state)
    short = Trainer(model, corpus, TrainArgs(steps=1, seq_len=32, batch_size=4, batch_size_start=4,
                                             warmup_steps=1))
    with pytest.raises(ValueError, match=r"the trainer state is at step 2, outside this run's 0 .. 1 steps"):
        short.load_state_dict(state)
