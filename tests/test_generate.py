"""Decoding (dsv3_lite.generate): plain and speculative, greedy and sampled."""
import copy
import itertools
import math

import pytest
import torch

from dsv3_lite.config import ModelArgs
from dsv3_lite.generate import compare_decoding, generate, restrict, stream, verify_drafts
from dsv3_lite.model import Transformer
from tests.models import make_agreeable, seeded

V = 64


def agreeable_model(seed: int = 3, noise: float = 0.5) -> Transformer:
    args = ModelArgs.tiny(vocab_size=V, mtp_depth=2, max_seq_len=64, original_seq_len=64, max_batch_size=4)
    return make_agreeable(seeded(args, seed).eval(), noise)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return agreeable_model()


def prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("batch,prompt_len", [(1, 1), (1, 9), (3, 1), (3, 9)])
@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_greedy_equals_plain_greedy(model, batch, prompt_len, depth):
    tokens = prompts(batch, prompt_len, seed=batch + prompt_len)
    plain, plain_stats = generate(model, tokens, 40)
    fast, stats = generate(model, tokens, 40, speculative=True, draft_depth=depth)
    assert torch.equal(fast, plain)
    assert torch.equal(plain[:, :prompt_len], tokens)
    assert plain_stats.tokens_per_forward == 1.0 and plain_stats.main_forwards == 40
    assert 0.2 < stats.acceptance_rate < 0.98  # drafts are sometimes right, sometimes wrong
    assert stats.main_forwards < 40 and stats.tokens_per_forward > 1.0


def test_greedy_matches_the_full_forward_argmax(model):
    tokens = prompts(2, 4)
    out, _ = generate(model, tokens, 12)
    with torch.no_grad():
        again = model(out[:, :-1]).argmax(-1)[:, 3:]
    assert torch.equal(out[:, 4:], again)


def reference_drafts(model: Transformer, committed: torch.Tensor, depth: int) -> torch.Tensor:
    """Greedy drafts recomputed from scratch, without any cache: depth k runs at positions 0 .. n-2."""
    n = committed.shape[1]
    seq = committed
    with torch.no_grad():
        h, _ = model.hidden_states(committed[:, :-1])
        for k in range(1, depth + 1):
            h, _ = model.mtp[k - 1](h, seq[:, k:n - 1 + k])
            seq = torch.cat([seq, model.head(h[:, -1]).argmax(-1, keepdim=True)], dim=1)
    return seq[:, n:]


@pytest.mark.parametrize("batch,prompt_len", [(1, 1), (3, 6)])
def test_mtp_caches_stay_consistent_with_the_accepted_tokens(model, batch, prompt_len):
    """Every draft equals the one a cache-free MTP chain computes from the committed tokens, so no stale
    entry of a rejected draft ever leaks into a later step."""
    out, stats = generate(model, prompts(batch, prompt_len, seed=7), 40, speculative=True, draft_depth=2)
    accepted = torch.cat(stats.accepted_per_step)
    assert (accepted == 0).any() and (accepted == 1).any()  # rejections at depth 1 and at depth 2 occurred
    for n, drafts in zip(stats.draft_positions, stats.drafts):
        assert torch.equal(drafts, reference_drafts(model, out[:, :n], drafts.shape[1]))


def test_statistics_match_an_independent_count(model):
    """Main-model forwards counted by a hook; acceptances recomputed from each step's drafts and the output
    (greedy speculative output is plain greedy output, so a draft is accepted iff it equals the output
    token at its position); the decoding schedule replayed from those counts."""
    prompt_len, new, depth = 3, 30, 2
    calls = []
    hook = model.layers[0].register_forward_hook(lambda *_: calls.append(1))  # once per main-model forward
    try:
        out, stats = generate(model, prompts(2, prompt_len), new, speculative=True)
    finally:
        hook.remove()
    total = prompt_len + new
    n, forwards, positions, drafted, accepted = prompt_len + 1, 1, [], [0] * depth, [0] * depth
    while n < total:  # replay: each forward verifies min(depth, tokens still to make - 1) drafts
        forwards += 1
        d = min(depth, total - n - 1)
        if d == 0:
            n += 1
            continue
        step = len(positions)
        positions.append(n)
        drafts = stats.drafts[step]
        assert drafts.shape == (2, d)
        n_accepted = (drafts == out[:, n:n + d]).long().cumprod(dim=1).sum(dim=1)
        assert torch.equal(stats.accepted_per_step[step], n_accepted)
        for k in range(d):
            drafted[k] += int((n_accepted >= k).sum())
            accepted[k] += int((n_accepted > k).sum())
        n += int(n_accepted.min()) + 1
    assert len(calls) == forwards == stats.main_forwards
    assert stats.draft_positions == positions and len(stats.drafts) == len(positions)
    assert (stats.drafted, stats.accepted) == (drafted, accepted)
    assert stats.acceptance_by_depth == [a / d for a, d in zip(accepted, drafted)]
    assert stats.tokens_per_forward == new / forwards > 1
    assert 0 < accepted[1] < accepted[0] < drafted[0]  # both depths accept and reject sometimes


# ----------------------------------------------------------------------------------- rejection sampling
def chi2_critical(dof: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty approximation; z = 3.09 is the normal's 0.999)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over cells with >= 5 expected counts (the rest pooled into one cell)."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def test_verify_drafts_preserves_the_target_distribution():
    """A synthetic two-draft chain with fixed tables: after accepting / correcting (and completing the
    sequence from p where the step stopped), the three tokens follow p exactly, not q."""
    g = torch.Generator().manual_seed(0)
    n, vocab = 200_000, 3
    dist = lambda *shape: torch.softmax(2 * torch.randn(*shape, vocab, generator=g), dim=-1)  # noqa: E731
    p0, p1, p2 = dist(), dist(vocab), dist(vocab, vocab)  # p(x1), p(x2 | x1), p(x3 | x1, x2)
    q1, q2 = dist(), dist(vocab)                          # draft: q(x1), q(x2 | x1)
    d1 = torch.multinomial(q1, n, replacement=True, generator=g)
    d2 = torch.multinomial(q2[d1], 1, generator=g).squeeze(1)
    target = torch.stack([p0.expand(n, -1), p1[d1], p2[d1, d2]], dim=1).log()
    n_acc, nxt = verify_drafts(target, torch.stack([d1, d2], 1), torch.stack([q1.expand(n, -1), q2[d1]], 1),
                               temperature=1.0, generator=g)
    sample = lambda probs: torch.multinomial(probs, 1, generator=g).squeeze(1)  # noqa: E731
    e1 = torch.where(n_acc >= 1, d1, nxt)
    e2 = torch.where(n_acc >= 2, d2, torch.where(n_acc == 1, nxt, sample(p1[e1])))
    e3 = torch.where(n_acc == 2, nxt, sample(p2[e1, e2]))
    counts = torch.bincount(e1 * 9 + e2 * 3 + e3, minlength=27).float()
    exact = (p0[:, None, None] * p1[:, :, None] * p2).flatten()
    stat, dof = chi2(counts, exact)
    assert stat < chi2_critical(dof)
    assert (n_acc == 2).float().mean() > 0.01 and (n_acc == 0).float().mean() > 0.01  # all paths exercised
    # the test has power: the drafts themselves follow q, far from p
    draft_only = torch.bincount(d1 * 3 + d2, minlength=9).float()
    stat_q, dof_q = chi2(draft_only, (p0[:, None] * p1).flatten())
    assert stat_q > 10 * chi2_critical(dof_q)


def restricted_by_hand(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The distribution top-k then top-p sampling draws from, one row at a time with Python lists."""
    out = []
    for row in torch.softmax(logits.double(), -1).reshape(-1, logits.shape[-1]).tolist():
        order = sorted(range(len(row)), key=lambda i: -row[i])[:top_k or len(row)]
        total = sum(row[i] for i in order)
        kept, mass = [], 0.0
        for i in order:
            if top_p is not None and mass >= top_p:
                break
            kept.append(i)
            mass += row[i] / total
        keep = sum(row[i] for i in kept)
        out.append([row[i] / keep if i in kept else 0.0 for i in range(len(row))])
    return torch.tensor(out, dtype=torch.float64).reshape(logits.shape)


@pytest.mark.parametrize("top_k,top_p", [(None, None), (3, None), (None, 0.7), (3, 0.8)])
def test_sampled_speculative_decoding_preserves_the_main_models_distribution(top_k, top_p):
    """End to end on a 4-token vocabulary: the joint law of 4 generated tokens equals the main model's,
    restricted by top-k / top-p where asked."""
    vocab, batch, new = 4, 4000, 4
    args = ModelArgs.tiny(vocab_size=vocab, mtp_depth=2, max_seq_len=8, original_seq_len=8, max_batch_size=batch,
                          init_std=0.3)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    prompt = torch.zeros(batch, 1, dtype=torch.long)
    out, stats = generate(model, prompt, new, temperature=1.0, top_k=top_k, top_p=top_p, speculative=True,
                          generator=torch.Generator().manual_seed(0))
    assert 0.05 < stats.acceptance_rate < 0.95
    cells = torch.tensor(list(itertools.product(range(vocab), repeat=new)))
    with torch.no_grad():
        seqs = torch.cat([torch.zeros(len(cells), 1, dtype=torch.long), cells], dim=1)
        probs = restricted_by_hand(model(seqs[:, :-1]), top_k, top_p)
        exact = probs.gather(-1, cells[..., None]).squeeze(-1).prod(-1)
    index = (out[:, 1:] * vocab ** torch.arange(new - 1, -1, -1)).sum(-1)
    counts = torch.bincount(index, minlength=len(cells)).float()
    assert counts[exact == 0].sum() == 0  # nothing outside the restriction is ever sampled
    stat, dof = chi2(counts, exact.float())
    assert stat < chi2_critical(dof)
    if top_k or top_p:  # the test has power: the unrestricted law is rejected
        stat_full, dof_full = chi2(counts, restricted_by_hand(model(seqs[:, :-1]).detach(), None, None)
                                   .gather(-1, cells[..., None]).squeeze(-1).prod(-1).float())
        assert counts[exact == 0].sum() == 0 and stat_full > chi2_critical(dof_full)


def test_restrict_matches_a_sort_by_hand():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(1))
    for top_k, top_p, temperature in [(1, None, 1.0), (4, None, 0.7), (None, 0.5, 1.0), (None, 0.9, 2.0),
                                      (6, 0.6, 1.3), (11, 1.0, 1.0), (20, None, 1.0)]:
        got = torch.softmax(restrict(logits, temperature, top_k, top_p) / temperature, -1)
        torch.testing.assert_close(got.double(), restricted_by_hand(logits / temperature, top_k, top_p))
    assert restrict(logits, 0.0, 1, 0.1) is logits  # greedy: argmax is always kept
    assert restrict(logits, 1.0) is logits


def test_sampling_is_reproducible_with_a_generator(model):
    tokens = prompts(2, 3)
    runs = [generate(model, tokens, 20, temperature=0.8, speculative=True,
                     generator=torch.Generator().manual_seed(5))[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    plain = [generate(model, tokens, 20, temperature=0.8, generator=torch.Generator().manual_seed(5))[0]
             for _ in range(2)]
    assert torch.equal(plain[0], plain[1])
    assert not torch.equal(plain[0], generate(model, tokens, 20)[0])  # sampling, not greedy


# ----------------------------------------------------------------------------------------------- checks
def test_verify_drafts_rejects_mismatched_shapes():
    logits, drafts = torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"target_logits \(2, 3, 5\) must be \(B, D\+1, V\)"):
        verify_drafts(logits, drafts[:, :1], None, 0.0)
    with pytest.raises(ValueError, match=r"draft_probs \(None\) must be \(B, D, V\) = \(2, 2, 5\)"):
        verify_drafts(logits, drafts, None, 1.0)
    n_accepted, _ = verify_drafts(logits, drafts, None, 0.0)  # greedy needs no draft distribution
    assert n_accepted.shape == (2,)


def test_bad_arguments_raise_clear_errors(model):
    tokens = prompts(1, 4)
    with pytest.raises(ValueError, match=r"max_seq_len \(64\)"):
        generate(model, tokens, 61)
    with pytest.raises(ValueError, match=r"max_new_tokens"):
        generate(model, tokens, 0)
    with pytest.raises(ValueError, match=r"temperature"):
        generate(model, tokens, 4, temperature=-1.0)
    with pytest.raises(ValueError, match=r"draft_depth \(3\)"):
        generate(model, tokens, 4, speculative=True, draft_depth=3)
    with pytest.raises(TypeError, match=r"int64 or int32"):
        generate(model, tokens.float(), 4)
    with pytest.raises(ValueError, match=r"vocab_size"):
        generate(model, tokens + V, 4)
    with pytest.raises(ValueError, match=r"draft_depth \(1\) is only used with speculative=True"):
        generate(model, tokens, 4, draft_depth=1)
    with pytest.raises(ValueError, match=r"draft_depth \(1.5\)"):
        generate(model, tokens, 4, speculative=True, draft_depth=1.5)
    for bad in ({"top_k": 0}, {"top_k": 2.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"stop_token": V}, {"stop_token": -1}):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=rf"{name} \({bad[name]!r}\) must be"):
            generate(model, tokens, 4, **bad)
    with pytest.raises(ValueError, match=r"tokens are on meta but the model is on cpu"):
        generate(model, tokens.to("meta"), 4)
    with pytest.raises(TypeError, match=r"speculative must be True or False, got str 'no'"):
        generate(model, tokens, 4, speculative="no")  # a non-empty string used to count as True
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int"):
        generate(model, tokens, 4, temperature=1.0, generator=42)
    torch.manual_seed(0)
    no_mtp = Transformer(model.args.replace(mtp_depth=0))
    with pytest.raises(ValueError, match=r"mtp_depth >= 1"):
        generate(no_mtp, tokens, 4, speculative=True)


@pytest.mark.parametrize("speculative", [False, True])
def test_logits_that_are_not_finite_raise(speculative):
    """A NaN in the embedding of the token the model generates third: greedy decoding is fine until that
    token is fed back, then stops with an error instead of emitting one token for ever."""
    model = agreeable_model()
    tokens = prompts(1, 4, seed=3)
    out, _ = generate(model, tokens, 8)
    bad = int(out[0, 6])
    assert bad not in out[0, :6].tolist()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.embed.weight[bad] = float("nan")
    assert torch.equal(generate(broken, tokens, 2)[0], out[:, :6])  # the first two are unaffected
    # speculative: the bad token is drafted and checked in one forward over positions 5-7, where its NaN
    # key and value can reach every query (0 * NaN is NaN), so an earlier position may report it
    position = "[5-7]" if speculative else "7"
    with pytest.raises(FloatingPointError, match=rf"token at position {position} are not finite.*FP32 or BF16"):
        generate(broken, tokens, 8, speculative=speculative)
    with torch.no_grad():
        broken.head.weight.fill_(float("nan"))  # sampling: the prefill's logits already fail
    with pytest.raises(FloatingPointError, match=r"token at position 4 are not finite"):
        generate(broken, tokens, 8, temperature=1.0, speculative=speculative,
                 generator=torch.Generator().manual_seed(0))


def test_generate_restores_the_model_state(model):
    model.train()
    generate(model, prompts(1, 2), 5, speculative=True)
    assert model.training
    assert not any(".cache_" in n for n, _ in model.named_buffers())
    model.eval()


def test_compare_decoding_reports_consistent_figures(model):
    batch = prompts(2, 5)
    result = compare_decoding(model, batch, 20, repeats=1)
    # the same figures, counted here from one speculative run per prompt
    runs = [generate(model, p[None], 20, speculative=True)[1] for p in batch]
    assert result.tokens_per_forward == pytest.approx(2 * 20 / sum(r.main_forwards for r in runs))
    assert result.acceptance_rate == pytest.approx(sum(r.accepted[0] for r in runs) / sum(r.drafted[0] for r in runs))
    assert 0 < result.acceptance_rate < 1 and result.tokens_per_forward > 1
    assert result.speedup > 0
    with pytest.raises(ValueError, match="repeats"):
        compare_decoding(model, prompts(1, 5), 5, repeats=0)


def test_generated_tokens_can_feed_training(model):
    out, stats = generate(model, prompts(2, 4), 6, speculative=True)  # decoding runs in inference mode
    assert not out.is_inference() and not torch.is_inference_mode_enabled()
    model.train()
    try:
        model.loss(out[:, :-1], out[:, 1:], mtp_lambda=0.3).total.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    assert stats.main_forwards > 1


# ------------------------------------------------------------------------------------- streaming, stopping
@pytest.mark.parametrize("speculative", [False, True])
def test_stream_yields_what_generate_returns_one_forward_at_a_time(model, speculative):
    tokens = prompts(2, 5, seed=4)
    full, stats = generate(model, tokens, 30, speculative=speculative)
    pieces, forwards = [], []
    for new, running in stream(model, tokens, 30, speculative=speculative):
        assert not torch.is_inference_mode_enabled() and not new.is_inference()  # nothing leaks between steps
        pieces.append(new)
        forwards.append(running.main_forwards)
    assert torch.equal(torch.cat([tokens, *pieces], 1), full)
    assert forwards == list(range(1, stats.main_forwards + 1))  # one piece per main-model forward
    widths = [p.shape[1] for p in pieces]
    if speculative:  # after the prefill's token: 1 + the batch's shortest accepted prefix
        assert widths == [1] + [1 + int(a.min()) for a in stats.accepted_per_step]
    else:
        assert widths == [1] * 30


def test_between_steps_and_after_a_stream_left_early_the_model_has_its_mode_and_no_cache(model):
    model.train()
    try:
        for i, _ in enumerate(stream(model, prompts(1, 3), 20, speculative=True)):
            assert model.training and not any(".cache_" in n for n, _ in model.named_buffers())
            if i == 2:
                break
        assert model.training
        assert not any(".cache_" in n for n, _ in model.named_buffers())
    finally:
        model.eval()


@pytest.mark.parametrize("speculative", [False, True])
def test_interleaved_streams_on_one_model_each_decode_their_own_prompt(model, speculative):
    """Each stream owns its KV cache: advancing two in turn gives each what it gives alone."""
    a, b = prompts(1, 5, seed=5), prompts(2, 7, seed=6)
    alone = [generate(model, p, 12, speculative=speculative)[0] for p in (a, b)]
    streams = [stream(model, p, 12, speculative=speculative) for p in (a, b)]
    pieces: list[list[torch.Tensor]] = [[], []]
    live = [0, 1]
    while live:
        for i in list(live):
            try:
                pieces[i].append(next(streams[i])[0])
            except StopIteration:
                live.remove(i)
    for p, got, want in zip((a, b), pieces, alone):
        assert torch.equal(torch.cat([p, *got], 1), want)


def test_threads_decoding_with_one_model_each_get_their_own_answer(model):
    import concurrent.futures
    tokens = [prompts(1, 4 + i % 3, seed=10 + i) for i in range(8)]
    alone = [generate(model, t, 10, speculative=bool(i % 2))[0] for i, t in enumerate(tokens)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda it: generate(model, it[1], 10, speculative=bool(it[0] % 2))[0],
                            enumerate(tokens)))
    assert all(torch.equal(g, w) for g, w in zip(got, alone))


def test_a_failed_call_leaves_the_models_mode_as_it_was(model):
    model.train()
    try:
        with pytest.raises(ValueError):
            generate(model, prompts(model.args.max_batch_size + 1, 3), 4)
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="max_new_tokens"):
        stream(model, prompts(1, 3), 0)  # checked at the call, before any token


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("every_row_stops", [False, True])
def test_decoding_stops_once_every_sequence_has_its_stop_token(model, speculative, every_row_stops):
    tokens = prompts(3, 4, seed=7)
    full, _ = generate(model, tokens, 40)
    new = [row[4:].tolist() for row in full]
    if every_row_stops:  # the token all rows produce whose last first occurrence comes soonest
        stop = min(set.intersection(*map(set, new)), key=lambda t: max(r.index(t) for r in new))
    else:
        stop = new[1][6]
    assert every_row_stops == all(stop in r for r in new)
    ends = [4 + r.index(stop) + 1 if stop in r else 44 for r in new]  # past the stop token
    out, stats = generate(model, tokens, 40, speculative=speculative, stop_token=stop)
    assert out.shape[1] == max(ends) == 4 + stats.new_tokens
    assert (max(ends) < 44) == every_row_stops  # decoding ends at the last row's stop token
    for row, full_row, end in zip(out, full, ends):
        assert torch.equal(row[:end], full_row[:end])  # the same tokens up to the stop token
        assert (row[end:] == stop).all()                # then only stop tokens


def test_a_stopped_sequence_neither_counts_nor_holds_the_batch_back(model):
    """Speculative greedy decoding of three prompts where one sequence stops early: after its stop token it
    is marked -1, the statistics count only the sequences still decoding, and each step advances by the
    fewest drafts accepted among those (drafts after an accepted stop token not counted)."""
    tokens = prompts(3, 4, seed=7)
    full, _ = generate(model, tokens, 40)
    new = [row[4:].tolist() for row in full]
    stop = next(t for t in new[1][3:] if t not in new[0] and t not in new[2])  # only sequence 1 stops
    out, stats = generate(model, tokens, 40, speculative=True, draft_depth=2, stop_token=stop)
    end = new[1].index(stop)
    assert torch.equal(out[[0, 2]], full[[0, 2]]) and (out[1, 4 + end + 1:] == stop).all()
    drafted, accepted, stopped_seen = [0, 0], [0, 0], False
    pieces = [p.shape[1] for p, _ in stream(model, tokens, 40, speculative=True, draft_depth=2, stop_token=stop)]
    for step, (kept, drafts, position) in enumerate(zip(stats.accepted_per_step, stats.drafts,
                                                        stats.draft_positions)):
        active = kept >= 0
        assert active[[0, 2]].all()
        stopped_seen |= not bool(active[1])
        if active[1]:  # an accepted stop token ends what counts
            hits = (drafts[1] == stop).nonzero()
            if len(hits):
                assert kept[1] <= hits[0, 0] + 1
        for k in range(drafts.shape[1]):
            drafted[k] += int((kept[active] >= k).sum())
            accepted[k] += int((kept[active] >= k + 1).sum())
        assert pieces[step + 1] == 1 + int(kept[active].min())
    assert stopped_seen and drafted == stats.drafted and accepted == stats.accepted
