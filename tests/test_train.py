"""The training helper: seeded and deterministic, its hooks run, its schedule is the documented one."""
import math

import pytest
import torch
from torch import nn

from dsv3_lite.data import Corpus, Document
from dsv3_lite.train import evaluate, lr_at, train_lm


class Bigram(nn.Module):
    def __init__(self, vocab=260):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, x):
        return self.table(x)


@pytest.fixture(scope="module")
def corpus():
    return Corpus([Document("text", "abcabcabd " * 20 + str(i)) for i in range(40)])


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


def test_schedule_warms_up_then_decays_to_a_tenth():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, 10) == pytest.approx(0.1, abs=1e-3)


def test_bad_arguments(corpus):
    with pytest.raises(ValueError, match=r"steps \(0\) must be > 0"):
        train_lm(Bigram(), corpus, steps=0)
    with pytest.raises(ValueError, match="must return logits"):
        evaluate(FlatModel(), corpus, batch_size=2, seq_len=4)


class FlatModel(nn.Module):
    def forward(self, x):
        return torch.zeros(x.numel(), 260)
