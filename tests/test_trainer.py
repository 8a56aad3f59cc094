"""The pre-training recipe: the report's schedules, AdamW groups, the balance-bias schedule, a history that
plots, precision options, determinism, and a resumed run equal bit for bit to an uninterrupted one."""
import dataclasses
import json
import math

import matplotlib
import pytest
import torch

from dsv3_lite import ModelArgs
from dsv3_lite.checkpoint import load_checkpoint, save_checkpoint
from dsv3_lite.data import Corpus, Document, build_documents
from dsv3_lite.model import Transformer
from dsv3_lite.tokenizer import BPETokenizer
from dsv3_lite.trainer import History, Trainer, TrainArgs
from tests.models import SMALL

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

RUN = dict(steps=10, seq_len=32, batch_size=8, batch_size_start=4, batch_warmup=0.3, warmup_steps=2,
           eval_batches=2)


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train((d.text for d in build_documents(60)), vocab_size=320)


def make_corpus(tok):
    # few enough training sequences (about 60) that a run passes over them more than once
    return Corpus(build_documents(4), val_every=4, tokenizer=tok, fim_rate=0.1, seed=0)


@pytest.fixture(scope="module")
def corpus(tok):
    return make_corpus(tok)


def make(tok, corpus, seed=0, **changes):
    args = TrainArgs(**{**RUN, **changes})
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.tiny(vocab_size=tok.vocab_size, fp8=args.precision == "fp8", **SMALL))
    return Trainer(model, corpus, args, progress=False)


def biases(model):
    return torch.cat([moe.gate.bias for moe in model.moe_layers()])


# ---------------------------------------------------------------------------------------------- schedules
def test_defaults_are_the_reports_breakpoints():
    """Report 4.2: 14.8T tokens; LR constant to 10T, cosine to 14.3T, 2.2e-5 for 333B, 7.3e-6 for the last
    167B; batch warm-up over 469B tokens; MTP lambda 0.3 then 0.1 after 10T; gamma 0 for the last 500B."""
    a = TrainArgs()
    assert (a.beta1, a.beta2, a.weight_decay, a.grad_clip, a.fim_rate) == (0.9, 0.95, 0.1, 1.0, 0.1)
    for value, report in [(a.decay_start, 10 / 14.8), (a.decay_end, 14.3 / 14.8), (a.final_start, 14.633 / 14.8),
                          (a.lr_decayed, 2.2e-5 / 2.2e-4), (a.lr_final, 7.3e-6 / 2.2e-4),
                          (a.batch_warmup, 0.469 / 14.8), (a.mtp_switch, 10 / 14.8), (a.gamma_off, 14.3 / 14.8)]:
        assert value == pytest.approx(report, abs=1e-3)
    assert (a.mtp_lambda, a.mtp_lambda_late) == (0.3, 0.1)


def test_learning_rate_shape():
    a = TrainArgs(steps=1000, lr=1.0, warmup_steps=10)
    assert a.lr_at(0) == pytest.approx(0.1) and a.lr_at(9) == 1.0  # linear warm-up
    assert a.lr_at(10) == a.lr_at(675) == 1.0  # constant
    middle = (a.decay_start + a.decay_end) / 2 * 1000
    assert a.lr_at(int(middle)) == pytest.approx(0.55, abs=0.01)  # halfway down the cosine
    assert a.lr_at(966) == a.lr_at(988) == pytest.approx(0.1)  # first final constant
    assert a.lr_at(989) == a.lr_at(999) == pytest.approx(0.033)  # last constant
    curve = [a.lr_at(s) for s in range(10, 1000)]
    assert all(x >= y for x, y in zip(curve, curve[1:]))
    short = TrainArgs(steps=4, lr=1.0, warmup_steps=10)  # warms up over all its steps
    assert [short.lr_at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_batch_size_grows_in_multiples_of_the_first_batch():
    a = TrainArgs(steps=1000, batch_size=32, batch_size_start=8, batch_warmup=0.1)
    sizes = [a.batch_size_at(s) for s in range(1000)]
    assert sizes[0] == 8 and sizes[99] == 32 and set(sizes[100:]) == {32}
    assert sorted(set(sizes)) == [8, 16, 24, 32] and sizes == sorted(sizes)
    assert [sizes.index(b) for b in (16, 24, 32)] == [25, 50, 75]
    assert TrainArgs(steps=10, batch_warmup=0.0).batch_size_at(0) == 32


def test_mtp_weight_and_bias_speed_schedules():
    a = TrainArgs(steps=1000)
    assert [a.mtp_lambda_at(s) for s in (0, 675, 676, 999)] == [0.3, 0.3, 0.1, 0.1]
    assert [a.gamma_at(s, 0.001) for s in (0, 965, 966, 999)] == [0.001, 0.001, 0.0, 0.0]


@pytest.mark.parametrize("setting,message", [
    (dict(steps=0), r"steps \(0\) must be >= 1"),
    (dict(lr=-1.0), r"lr \(-1.0\) must be a finite number > 0"),
    (dict(batch_size=8, batch_size_start=16), r"batch_size_start \(16\) must be <= batch_size \(8\)"),
    (dict(decay_start=0.9, decay_end=0.8), r"decay_start \(0.9\) <= decay_end \(0.8\)"),
    (dict(gamma_off=1.5), r"gamma_off \(1.5\) must be in \[0, 1\]"),
    (dict(precision="fp16"), r"precision \('fp16'\) must be 'fp32', 'bf16' or 'fp8'"),
    (dict(grad_clip=-1.0), r"grad_clip \(-1.0\) must be a finite number >= 0 \(0 switches clipping off\)"),
    (dict(seq_len=32.0), r"seq_len must be an int, got float"),
    (dict(seed=2**63), r"seed \(9223372036854775808\) must be < 2\*\*40"),
])
def test_bad_train_args(setting, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TrainArgs(**setting)


# ------------------------------------------------------------------------------------------------ trainer
def test_optimizer_decays_matrices_only(tok, corpus):
    trainer = make(tok, corpus)
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["betas"] == (0.9, 0.95)
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(moe.gate.bias) in in_optimizer for moe in trainer.model.moe_layers())  # moved by gamma


def test_training_is_deterministic_learns_and_records_its_history(tok, corpus):
    a, b = make(tok, corpus), make(tok, corpus)
    h = a.train()
    assert b.train().train_loss == h.train_loss
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert torch.equal(biases(a.model), biases(b.model))
    assert a.position > len(a.sequences)  # the run passed over the data more than once
    n = RUN["steps"]
    for name in ("train_loss", "main_loss", "mtp_loss", "lr", "batch_size", "max_violation", "grad_norm",
                 "tokens_per_s"):
        assert len(getattr(h, name)) == n, name
    assert h.batch_size == [a.args.batch_size_at(s) for s in range(n)] == [4, 4, 8, 8, 8, 8, 8, 8, 8, 8]
    assert h.lr == [a.args.lr_at(s) for s in range(n)]
    assert h.main_loss[-1] < h.main_loss[0] - 0.3
    assert all(t == pytest.approx(m + x, abs=1e-3) for t, m, x in zip(h.train_loss, h.main_loss, h.mtp_loss))
    assert all(v >= 0 for v in h.max_violation) and all(g > 0 for g in h.grad_norm)
    step, loss = h.val_loss[-1]
    assert step == n and math.isfinite(loss) and sorted(h.val_by_domain[-1][1]) == sorted(corpus.domains)
    saved = json.dumps(dataclasses.asdict(h))  # as history.json (NaN: a domain absent from the windows)
    assert json.dumps(dataclasses.asdict(History.from_dict(json.loads(saved)))) == saved
    fig = h.plot(Figure(figsize=(10, 5)))
    assert len(fig.axes) == 6 and fig.axes[0].get_title() == "loss (nats/token)"


def test_batches_pass_over_every_sequence_once_per_epoch(tok, corpus):
    trainer = make(tok, corpus)
    n = len(trainer.sequences)
    seen = []
    while trainer.position < 2 * n:
        size = min(7, 2 * n - trainer.position)
        x, y = trainer._batch(size)
        assert torch.equal(x[:, 1:], y[:, :-1])
        seen.append(torch.cat([x, y[:, -1:]], dim=1))
        trainer.position += size
    seen = torch.cat(seen)
    for epoch in (seen[:n], seen[n:]):
        assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, trainer.sequences.tolist()))
    assert not torch.equal(seen[:n], seen[n:])  # each pass in its own order


def test_balance_biases_move_until_gamma_off(tok, corpus):
    trainer = make(tok, corpus, gamma_off=0.5)
    start = biases(trainer.model).clone()
    trainer.train(until=5)
    middle = biases(trainer.model).clone()
    trainer.train()
    assert not torch.equal(start, middle) and torch.equal(middle, biases(trainer.model))
    assert (middle - start).abs().max() <= 5 * trainer.model.args.bias_update_speed + 1e-9


def test_resumed_run_equals_the_uninterrupted_one_bit_for_bit(tok, corpus, tmp_path):
    """N steps vs N/2 + save + load + N/2, across a pass over the data and the batch-size warm-up."""
    whole = make(tok, corpus)
    whole.train()
    first = make(tok, corpus)
    first.train(until=5)
    save_checkpoint(tmp_path, first.model, tok, first)
    torch.manual_seed(123)  # whatever happened in between
    saved = load_checkpoint(tmp_path)
    second = Trainer(saved.model, make_corpus(saved.tokenizer), saved.train_args, progress=False)
    second.load_state_dict(saved.trainer_state)
    assert second.step == 5
    history = second.train()
    assert history.train_loss == whole.history.train_loss
    assert history.val_loss == whole.history.val_loss
    assert history.grad_norm == whole.history.grad_norm
    for (name, p), q in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert torch.equal(torch.get_rng_state(), whole_rng_after(tok, corpus))


def test_a_resume_without_the_optimizer_state_starts_right_then_drifts(tok, corpus, tmp_path):
    """Chapter 7, exercise 3: weights, step and data position without AdamW's moments. The first loss is
    the uninterrupted run's (same weights, same batch); after the first update the runs part."""
    whole = make(tok, corpus)
    whole.train()
    first = make(tok, corpus)
    first.train(until=5)
    save_checkpoint(tmp_path, first.model, tok, first)
    saved = load_checkpoint(tmp_path)
    forgetful = Trainer(saved.model, make_corpus(saved.tokenizer), saved.train_args, progress=False)
    forgetful.step, forgetful.position = saved.trainer_state["step"], saved.trainer_state["position"]
    history = forgetful.train()
    assert history.train_loss[0] == whole.history.train_loss[5]
    assert all(a != b for a, b in zip(history.train_loss[1:], whole.history.train_loss[6:]))


def whole_rng_after(tok, corpus):
    """torch's random state after an uninterrupted run (the trainer draws nothing from it)."""
    make(tok, corpus).train()
    return torch.get_rng_state()


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_lower_precision_trains_close_to_fp32(tok, corpus, precision):
    reference = make(tok, corpus, steps=3, warmup_steps=1).train()
    history = make(tok, corpus, steps=3, warmup_steps=1, precision=precision).train()
    assert history.main_loss[0] == pytest.approx(reference.main_loss[0], rel=0.02)
    assert all(math.isfinite(v) for v in history.train_loss)


def test_precision_must_match_the_model(tok, corpus):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.tiny(vocab_size=tok.vocab_size, **SMALL))
    with pytest.raises(ValueError, match=r"precision 'fp8' needs a model with ModelArgs.fp8=True"):
        Trainer(model, corpus, TrainArgs(**RUN, precision="fp8"))


@pytest.mark.parametrize("change,message", [
    (dict(seq_len=128), r"seq_len \(128\) must be <= the model's max_seq_len \(64\)"),
    (dict(fim_rate=0.0), r"the corpus was built with fim_rate 0.1, TrainArgs has 0.0"),
])
def test_setting_that_does_not_fit_the_model_or_corpus(tok, corpus, change, message):
    with pytest.raises(ValueError, match=message):
        make(tok, corpus, **change)


def test_vocabulary_must_fit(tok, corpus):
    model = Transformer(ModelArgs.tiny(vocab_size=260, **SMALL))
    with pytest.raises(ValueError, match=r"tokenizer has 320 tokens, more than the model's vocab_size \(260\)"):
        Trainer(model, corpus, TrainArgs(**RUN))


def test_until_must_lie_ahead(tok, corpus):
    trainer = make(tok, corpus)
    trainer.train(until=2)
    with pytest.raises(ValueError, match=r"until \(1\) must be >= 2"):
        trainer.train(until=1)
    with pytest.raises(ValueError, match=r"until \(11\) must be <= steps \(10\)"):
        trainer.train(until=11)


def test_a_loss_that_is_not_finite_stops_before_the_step(tok, corpus):
    """A weight that is already NaN or infinite is named (no learning rate caused it); a run whose loss or
    gradient overflows is told to lower the learning rate. The step is never applied."""
    trainer = make(tok, corpus)
    with torch.no_grad():
        trainer.model.head.weight[0, 0] = float("inf")
    before = [p.clone() for p in trainer.model.parameters()]
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 1 of 10 \(the step is not applied\): the "
                                                 r"weight head.weight already holds NaN or infinite values.*the "
                                                 r"learning rate is not the cause"):
        trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before))
    assert trainer.step == 0

    trainer = make(tok, corpus)  # the logits overflow at step 2: the run diverged
    trainer.model.head.register_forward_hook(
        lambda module, args, out: out * float("nan") if trainer.step == 1 else None)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 2 of 10 .*: the run diverged or "
                                                 r"overflowed. Try a lower lr \(now 0.003\)"):
        trainer.train()
    assert trainer.step == 1

    trainer = make(tok, corpus)  # a finite loss whose gradient overflows: clipping would spread NaN everywhere
    before = [p.clone() for p in trainer.model.parameters()]
    trainer.model.head.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(FloatingPointError, match=r"the gradient norm is (inf|nan) at step 1 of 10 .*diverged"):
        trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before))


def test_a_corpus_too_small_for_one_window_is_refused_before_training(tok):
    """A validation split shorter than seq_len used to fail at the first evaluation, after the run trained."""
    small = Corpus([Document("text", f"tiny {i}") for i in range(20)], tokenizer=tok, fim_rate=0.1)
    with pytest.raises(ValueError, match=r"seq_len \(16\) must be < the corpus' val split \(\d+ tokens\): give "
                                         r"more text or a shorter seq_len"):
        make(tok, small, seq_len=16)


# ------------------------------------------------------------------------------------ schedules in tokens
# Report 4.2's breakpoints as fractions of its 14.8T tokens
REPORT_TOKENS = dict(batch_warmup=0.469 / 14.8, decay_start=10 / 14.8, decay_end=14.3 / 14.8,
                     final_start=14.633 / 14.8, mtp_switch=10 / 14.8, gamma_off=14.3 / 14.8)


def token_counts(run):
    """Tokens trained on before each step 0 .. steps, summed here from the batch schedule."""
    counts = [0]
    for step in range(run.steps):
        counts.append(counts[-1] + run.batch_size_at(step) * run.seq_len)
    return counts


def report_lr(t):
    """Report 4.2's learning rate after t trillion tokens (warm-up left out)."""
    peak, low = 2.2e-4, 2.2e-5
    if t < 10:
        return peak
    if t < 14.3:
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (t - 10) / 4.3))
    return low if t < 14.633 else 7.3e-6


def test_breakpoints_in_tokens_follow_the_reports_formula():
    """The report's run scaled down: 3,072 -> 15,360 sequences of 4K becomes 3 -> 15 of 4 tokens, 14.8T
    tokens the run's total. At every step each schedule takes the report's value at the tokens trained on
    before it: exactly for the constants and switches; the cosine within 0.005 x peak, since its ends fall on
    whole steps (one step: 60 of about 118K tokens, 0.0075T of the report's, at most 0.0025 x peak on the
    cosine's steepest part)."""
    run = TrainArgs(steps=2000, seq_len=4, batch_size=15, batch_size_start=3, lr=2.2e-4, warmup_steps=17,
                    lr_decayed=0.1, lr_final=7.3e-6 / 2.2e-4).in_tokens(**REPORT_TOKENS)
    counts = token_counts(run)
    for step in range(run.steps):
        t = 14.8 * counts[step] / counts[-1]
        assert run.mtp_lambda_at(step) == (0.3 if t < 10 else 0.1), step
        assert run.gamma_at(step, 1e-3) == (1e-3 if t < 14.3 else 0.0), step
        if t >= 0.469:
            assert run.batch_size_at(step) == 15, step
        if step >= run.warmup_steps:
            if 10 <= t < 14.3:
                assert run.lr_at(step) == pytest.approx(report_lr(t), abs=0.005 * 2.2e-4), step
            else:
                assert run.lr_at(step) == pytest.approx(report_lr(t), rel=1e-9), step
    # the batch grows over the fewest steps that train on 469B of 14.8T tokens
    ramp = round(run.batch_warmup * run.steps)
    assert counts[ramp] >= REPORT_TOKENS["batch_warmup"] * counts[-1]
    shorter = token_counts(run.replace(batch_warmup=(ramp - 1) / run.steps))
    assert shorter[ramp - 1] < REPORT_TOKENS["batch_warmup"] * shorter[-1]


def test_breakpoints_as_token_counts_fall_on_the_first_step_that_reaches_them():
    run = TrainArgs(steps=40, seq_len=8, batch_size=8, batch_size_start=2, batch_warmup=0.25, warmup_steps=4)
    counts = token_counts(run)
    placed = run.in_tokens(decay_start=1000, decay_end=1500, final_start=1500, mtp_switch=1000,
                           gamma_off=counts[-1])
    first = next(s for s in range(run.steps) if counts[s] >= 1000)
    assert placed.mtp_lambda_at(first - 1) == 0.3 and placed.mtp_lambda_at(first) == 0.1
    assert placed.decay_start == first / run.steps  # the cosine starts at lr there, then falls
    assert placed.lr_at(first) == run.lr > placed.lr_at(first + 1)
    assert placed.gamma_off == 1.0 and placed.gamma_at(run.steps - 1, 1e-3) == 1e-3
    assert placed.batch_warmup == run.batch_warmup  # not given: unchanged
    assert placed == run.in_tokens(decay_start=1000 / counts[-1], decay_end=1500, final_start=1500,
                                   mtp_switch=1000, gamma_off=1.0)
    assert run.in_tokens() == run
    ramp = run.in_tokens(batch_warmup=100)  # the fewest steps whose growing batch covers 100 tokens
    k = round(ramp.batch_warmup * run.steps)
    assert ramp.batch_warmup == k / run.steps and token_counts(ramp)[k] >= 100
    assert token_counts(run.replace(batch_warmup=(k - 1) / run.steps))[k - 1] < 100


@pytest.mark.parametrize("breakpoints,message", [
    (dict(decay_start=1.5), r"decay_start \(1.5\) must be a fraction of the run's tokens in \[0, 1\]"),
    (dict(decay_start=-3), r"decay_start \(-3 tokens\) must be >= 0"),
    (dict(decay_start="10T"), r"decay_start in tokens must be an int \(a count\) or a float"),
    (dict(gamma_off=True), r"gamma_off in tokens must be an int"),
    (dict(warmup_steps=5), r"in_tokens takes batch_warmup, .*; not warmup_steps"),
    (dict(mtp_switch=10**6), r"mtp_switch \(1,000,000 tokens\) must be <= the run's [\d,]+ tokens"),
    (dict(batch_warmup=10**6), r"batch_warmup \(1,000,000 tokens\) must be <= the tokens of a run whose"),
    (dict(decay_start=0.9, decay_end=0.5), r"fall out of order: decay_start \([\d.]+\) <= decay_end"),
])
def test_bad_breakpoints_in_tokens(breakpoints, message):
    run = TrainArgs(steps=40, seq_len=8, batch_size=32, batch_size_start=8, batch_warmup=0.25)
    with pytest.raises((ValueError, TypeError), match=message):
        run.in_tokens(**breakpoints)


def test_an_extended_run_continues_on_the_longer_runs_schedules(tok, corpus, tmp_path):
    """A finished 10-step run resumed with steps=16: the first 10 steps are the saved run's, the next 6 take
    each schedule of a 16-step run at their step, and the data continue where they stopped."""
    first = make(tok, corpus)
    first.train()
    save_checkpoint(tmp_path, first.model, tok, first)
    saved = load_checkpoint(tmp_path)
    longer = saved.train_args.replace(steps=16)
    extended = Trainer(saved.model, make_corpus(saved.tokenizer), longer, progress=False)
    extended.load_state_dict(saved.trainer_state)
    history = extended.train()
    assert history.train_loss[:10] == first.history.train_loss and history.lr[:10] == first.history.lr
    assert history.lr[10:] == [longer.lr_at(s) for s in range(10, 16)]
    assert history.batch_size[10:] == [longer.batch_size_at(s) for s in range(10, 16)]
    assert [step for step, _ in history.val_loss] == [10, 16]
    assert extended.position == sum(history.batch_size)
