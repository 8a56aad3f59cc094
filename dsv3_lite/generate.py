"""Decoding with the KV cache: greedy, sampled, and self-speculative with the
MTP modules (report 2.2, 5.4.3).

Plain decoding runs one main-model forward per new token. Speculative decoding lets
the MTP modules draft the next D tokens cheaply (each depth is one block), then checks
all of them with ONE main-model forward over [last token, draft_1 .. draft_D]:

- greedy (temperature 0): keep the longest prefix of drafts equal to the main
  model's own argmax, then append the main model's token at the first disagreement
  (or after the last draft). The output is exactly what plain greedy decoding
  produces; only the number of main-model forwards changes.
- sampling (temperature > 0): accept draft x with probability min(1, p(x) / q(x))
  (p: main model, q: MTP draft distribution); at the first rejection sample
  from the residual max(0, p - q), normalised; if all are accepted, sample one
  more token from p. Every emitted token is then distributed exactly as under p
  (Leviathan et al. 2023; Chen et al. 2023).

A batch shares one position counter (the attention caches are indexed by position),
so it advances by the shortest accepted prefix of its sequences; acceptance statistics
count every sequence's own agreement. A sequence that has produced the stop token
no longer counts, in either.

The caches stay consistent with the accepted tokens without copying anything: a cache
entry at position i is only read by queries at positions >= i, and the next forward at
a position overwrites whatever a rejected draft left there. MTP depth k at position i
reads the token t_{i+k}, so its entries at the last k - 1 positions depend on drafts;
those are recomputed at the next step (`_Drafter`).
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch

from dsv3_lite.config import check_number
from dsv3_lite.model import Transformer


@dataclass
class GenerationStats:
    """What one `generate` call did. Drafting counts are summed over the
    batch's sequences."""

    batch_size: int
    new_tokens: int                  # tokens generated per sequence (fewer than
                                     # asked for once every one has stopped)
    main_forwards: int = 0           # main-model forward passes, the prefill included
    drafted: list[int] = field(default_factory=list)   # per depth k: drafts checked
                                                       # (depths < k all accepted)
    accepted: list[int] = field(default_factory=list)  # per depth k: drafts accepted
    # per verify step: position of the first draft
    draft_positions: list[int] = field(default_factory=list)
    # per verify step: (B,) drafts accepted (-1: the sequence had stopped)
    accepted_per_step: list[torch.Tensor] = field(default_factory=list)
    # per verify step: (B, depth) drafted tokens
    drafts: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0             # wall-clock time of the decoding steps

    @property
    def acceptance_by_depth(self) -> list[float]:
        """P(draft k accepted | drafts 1 .. k-1 accepted), per depth k."""
        return _ratios(self.accepted, self.drafted)

    @property
    def acceptance_rate(self) -> float:
        """Acceptance of the first draft: the report's "acceptance rate of the
        second token prediction"."""
        return self.acceptance_by_depth[0] if self.drafted else float("nan")

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per sequence per main-model forward
        (exactly 1 for plain decoding)."""
        return self.new_tokens / self.main_forwards

    @property
    def tokens_per_second(self) -> float:
        return self.batch_size * self.new_tokens / self.seconds


def _ratios(accepted: list[int], drafted: list[int]) -> list[float]:
    return [a / d if d else float("nan") for a, d in zip(accepted, drafted)]


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def _finite(logits: torch.Tensor, position: int) -> torch.Tensor:
    """`logits` (B, V), or (B, S, V) for the tokens at positions `position`..,
    if every entry is finite: NaN logits (an FP16 overflow, diverged weights)
    would decode as the same token for ever. One check per main-model forward
    (one device sync), none per layer."""
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(-1).reshape(len(logits), -1).any(0)
        raise FloatingPointError(
            "the model's logits for the token at position "
            f"{position + int(bad.nonzero()[0])} are not finite (NaN or inf), so no "
            "token can be decoded from them: check the weights (torch.isfinite on "
            "each parameter) and run in FP32 or BF16 rather than FP16")
    return logits


def _pick(logits: torch.Tensor, temperature: float,
          generator: torch.Generator | None) -> torch.Tensor:
    """Greedy (temperature 0) or sampled token ids for logits (..., V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = _probs(logits, temperature)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1,
                             generator=generator).view(probs.shape[:-1])


def verify_drafts(target_logits: torch.Tensor, drafts: torch.Tensor,
                  draft_probs: torch.Tensor | None, temperature: float,
                  generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decide how many drafts each sequence keeps and which token follows them.

    target_logits (B, D+1, V): the main model's logits at the last accepted token and
    at each draft; drafts (B, D); draft_probs (B, D, V): the distributions the drafts
    were sampled from (unused when greedy). Returns n_accepted (B,) in [0, D] and the
    next token (B,): the main model's correction at the first rejected draft, or its
    own next token after D accepted drafts.
    """
    if (target_logits.ndim != 3 or drafts.ndim != 2
            or target_logits.shape[:2] != (len(drafts), drafts.shape[1] + 1)):
        raise ValueError(f"target_logits {tuple(target_logits.shape)} must be "
                         f"(B, D+1, V) for drafts (B, D) {tuple(drafts.shape)}")
    if temperature > 0 and drafts.shape[1] and (
            draft_probs is None
            or draft_probs.shape != (*drafts.shape, target_logits.shape[-1])):
        shape = None if draft_probs is None else tuple(draft_probs.shape)
        raise ValueError(f"draft_probs ({shape}) must be (B, D, V) = "
                         f"{(*drafts.shape, target_logits.shape[-1])} when "
                         "temperature > 0")
    n_drafts = drafts.shape[1]
    if n_drafts == 0:
        return (drafts.new_zeros(len(drafts)),
                _pick(target_logits[:, 0], temperature, generator))
    if temperature == 0:
        target = target_logits.argmax(dim=-1)
        keep = drafts == target[:, :n_drafts]
        n_accepted = keep.long().cumprod(dim=1).sum(dim=1)
        return n_accepted, target.gather(1, n_accepted[:, None]).squeeze(1)
    p = _probs(target_logits, temperature)
    p_draft = p[:, :n_drafts].gather(-1, drafts[..., None]).squeeze(-1)
    q_draft = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(p_draft.shape, generator=generator, device=p.device)
    keep = u * q_draft < p_draft  # accept with probability min(1, p / q)
    n_accepted = keep.long().cumprod(dim=1).sum(dim=1)
    # After a rejection at depth j: the residual max(0, p_j - q_j); after D
    # acceptances: p_D itself.
    residual = torch.cat(
        [(p[:, :n_drafts] - draft_probs).clamp_min(0), p[:, n_drafts:]], dim=1)
    rows = torch.arange(len(drafts), device=p.device)
    dist = residual[rows, n_accepted]
    # p == q: a rejection has probability 0; fall back to p
    empty = dist.sum(-1, keepdim=True) <= 0
    dist = torch.where(empty, p[rows, n_accepted], dist)
    return n_accepted, torch.multinomial(dist, 1, generator=generator).squeeze(1)


class _Drafter:
    """Runs the MTP chain during decoding and keeps its caches consistent
    with the accepted tokens.

    hidden[k] holds h^k for every position computed so far (h^0 from the main model).
    fresh[k] is the first position whose depth-k entries must be recomputed:
    with n committed tokens, depth k at position i reads t_{i+k}, which is
    committed only for i <= n-1-k.
    """

    def __init__(self, model: Transformer, batch_size: int, length: int, depth: int):
        self.model, self.depth = model, depth
        weight = model.embed.weight
        self.hidden = [weight.new_zeros(batch_size, length, model.args.dim)
                       for _ in range(depth)]
        self.fresh = [0] * (depth + 1)

    @torch.no_grad()
    def draft(self, seq: torch.Tensor, n: int, depth: int,
              sampling: tuple[float, int | None, float | None],
              generator: torch.Generator | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft seq[:, n : n + depth] (written in place) from the n committed tokens;
        return the drafts and their distributions. Every depth runs at positions
        fresh[k] .. n-2; its last one drafts a token."""
        probs = []
        for k in range(1, depth + 1):
            lo = self.fresh[k]
            h, _ = self.model.mtp[k - 1](self.hidden[k - 1][:, lo:n - 1],
                                         seq[:, lo + k:n - 1 + k], start_pos=lo)
            if k < self.depth:
                self.hidden[k][:, lo:n - 1] = h
            temperature = sampling[0]
            logits = restrict(self.model.head(h[:, -1]), *sampling)
            seq[:, n + k - 1] = _pick(logits, temperature, generator)
            if temperature > 0:
                probs.append(_probs(logits, temperature))
            self.fresh[k] = n - k
        return seq[:, n:n + depth], torch.stack(probs, dim=1) if probs else None


def _check_args(model: Transformer, tokens: torch.Tensor, max_new_tokens: int,
                temperature: float, top_k: int | None, top_p: float | None,
                speculative: bool, draft_depth: int | None,
                generator: torch.Generator | None, stop_token: int | None) -> int:
    model.check_tokens(tokens)
    device = model.embed.weight.device
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__} (a seed? "
                        "torch.Generator().manual_seed(seed))")
    if not isinstance(speculative, bool):
        raise TypeError(f"speculative must be True or False, got "
                        f"{type(speculative).__name__} {speculative!r}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but "
                         f"the model is on {device}: create it with "
                         f"torch.Generator(device={str(device)!r})")
    if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
            or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens ({max_new_tokens!r}) must be an int >= 1")
    total = tokens.shape[1] + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError("prompt length + max_new_tokens "
                         f"({tokens.shape[1]} + {max_new_tokens}) must be <= "
                         f"max_seq_len ({model.args.max_seq_len})")
    check_number("temperature", temperature)
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature ({temperature}) must be finite and >= 0 "
                         "(0: greedy; an infinite one would sample uniform noise)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k ({top_k!r}) must be an int >= 1, or None for all "
                         "tokens")
    if top_p is not None and (isinstance(top_p, bool)
                              or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p ({top_p!r}) must be in (0, 1], or None for all "
                         "tokens")
    if temperature == 0 and (top_k is not None or top_p is not None):
        warnings.warn("top_k and top_p restrict sampling; with temperature 0 "
                      "decoding is greedy and they change nothing", stacklevel=3)
    if stop_token is not None and (
            isinstance(stop_token, bool) or not isinstance(stop_token, int)
            or not 0 <= stop_token < model.args.vocab_size):
        raise ValueError(f"stop_token ({stop_token!r}) must be a token id in [0, "
                         f"vocab_size ({model.args.vocab_size})), or None")
    if not speculative:
        if draft_depth is not None:
            raise ValueError(f"draft_depth ({draft_depth}) is only used with "
                             "speculative=True")
        return 0
    depth = len(model.mtp) if draft_depth is None else draft_depth
    if (isinstance(depth, bool) or not isinstance(depth, int)
            or not 1 <= depth <= len(model.mtp)):
        raise ValueError(f"draft_depth ({depth}) must be in [1, the model's MTP "
                         f"depth ({len(model.mtp)})]; speculative decoding needs a "
                         "model built with mtp_depth >= 1")
    return depth


def restrict(logits: torch.Tensor, temperature: float, top_k: int | None = None,
             top_p: float | None = None) -> torch.Tensor:
    """`logits` (..., V) with the tokens that may not be sampled set to -inf. top-k
    keeps the k most likely tokens (and any tied with the k-th); top-p then keeps
    the fewest most likely of those whose probabilities at `temperature`, normalised
    over them, sum to at least p (1 keeps them all). Greedy decoding (temperature
    0) or None for both leaves the logits as they are. Speculative sampling then
    samples the restricted distribution exactly, because the main model's
    distribution is restricted; the drafts are restricted too, so that they are
    drawn where the main model can accept them."""
    if temperature == 0 or (top_k is None and top_p is None):
        return logits
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        probs, order = _probs(logits, temperature).sort(dim=-1, descending=True)
        # drop a token when the more likely tokens already reach top_p
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class _Decoder:
    """One decoding run, a main-model forward per `step`. Each step runs in
    inference mode (no autograd bookkeeping at all: faster than no_grad for the
    many small ops of a decode step), and only inside the step, so nothing leaks
    into the caller's code between steps."""

    def __init__(self, model: Transformer, tokens: torch.Tensor, max_new_tokens: int,
                 depth: int, sampling: tuple[float, int | None, float | None],
                 generator: torch.Generator | None, stop_token: int | None):
        self.model, self.depth, self.sampling = model, depth, sampling
        self.generator, self.stop_token = generator, stop_token
        batch, self.prompt_len = tokens.shape
        self.total = self.prompt_len + max_new_tokens
        self.n = 0  # tokens committed, the prompt included
        self.finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
        self.stats = GenerationStats(batch, 0, drafted=[0] * depth,
                                     accepted=[0] * depth)
        with torch.inference_mode():
            self.seq = tokens.new_zeros(batch, self.total)
            self.seq[:, :self.prompt_len] = tokens
            self.drafter = (_Drafter(model, batch, self.total, depth)
                            if depth else None)

    @property
    def done(self) -> bool:
        return self.n == self.total or bool(self.finished.all())

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        return _pick(restrict(logits, *self.sampling), self.sampling[0],
                     self.generator)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Run one main-model forward (the prefill first); return the tokens it
        committed, (B, k) with k >= 1, a view of the sequences."""
        start = time.perf_counter()
        model, seq, first = self.model, self.seq, self.n
        if first == 0:
            h, _ = model.hidden_states(seq[:, :self.prompt_len], 0)
            seq[:, self.prompt_len] = self._pick(
                _finite(model.head(h[:, -1]), self.prompt_len))
            if self.drafter:
                self.drafter.hidden[0][:, :self.prompt_len] = h
            first, self.n = self.prompt_len, self.prompt_len + 1
        elif self.drafter is None:
            n = self.n
            seq[:, n] = self._pick(_finite(model(seq[:, n - 1:n], n - 1)[:, -1], n))
            self.n += 1
        else:
            self.n = _speculative_step(model, self.drafter, seq, self.n,
                                       min(self.depth, self.total - self.n - 1),
                                       self.sampling, self.generator, self.stats,
                                       ~self.finished, self.stop_token)
        self.stats.main_forwards += 1
        new = seq[:, first:self.n]
        if self.stop_token is not None:
            # tokens after a sequence's stop token become stop tokens too
            stopped = (new == self.stop_token).long().cumsum(1) > 0
            after = torch.cat([self.finished[:, None], stopped[:, :-1]], dim=1)
            after |= self.finished[:, None]
            new.masked_fill_(after, self.stop_token)
            self.finished |= stopped[:, -1]
            if self.finished.all():  # end at the last sequence's stop token
                keep = int((~after).any(0).sum())
                self.n -= new.shape[1] - keep
                new = new[:, :keep]
        self.stats.new_tokens = self.n - self.prompt_len
        self.stats.seconds += time.perf_counter() - start
        return new


def stream(model: Transformer, tokens: torch.Tensor, max_new_tokens: int,
           temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, speculative: bool = False,
           draft_depth: int | None = None, generator: torch.Generator | None = None,
           stop_token: int | None = None
           ) -> Iterator[tuple[torch.Tensor, GenerationStats]]:
    """Decode like `generate`, yielding as soon as each main-model forward is done:
    (the tokens it committed (B, k), the statistics so far). The prefill commits one
    token, a plain step one, a speculative step 1 + the drafts accepted.

    The arguments are checked before the first token. The stream owns its KV cache:
    the model holds it (in eval mode) only during a step, under a lock, so several
    streams and threads may decode with one model at once, each with its own cache;
    between steps the model has no cache and its own mode.
    """
    depth = _check_args(model, tokens, max_new_tokens, temperature, top_k, top_p,
                        speculative, draft_depth, generator, stop_token)
    return _stream(model, _Decoder(model, tokens, max_new_tokens, depth,
                                   (temperature, top_k, top_p), generator,
                                   stop_token))


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its Lock
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _turn(model: Transformer, cache: list[dict[str, torch.Tensor]] | None):
    """One step of a decoding on a model that other decodings (other threads, other
    open streams) may share: the model to itself, in eval mode, holding this
    decoding's KV cache; afterwards its mode as before and no cache, whatever
    happened. Yields a list that receives the cache taken back after the step."""
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(model, threading.Lock())
    with lock:
        was_training = model.training
        taken: list[dict[str, torch.Tensor]] = []
        try:
            model.eval()
            if cache is not None:
                model.put_cache(cache)
            yield taken
        finally:
            taken.extend(model.take_cache())
            model.train(was_training)


def _stream(model: Transformer, decoder: _Decoder
            ) -> Iterator[tuple[torch.Tensor, GenerationStats]]:
    with _turn(model, None) as cache, torch.inference_mode():
        model.allocate_cache(decoder.stats.batch_size)
    while not decoder.done:
        with _turn(model, cache) as cache:
            # cloned outside inference mode: an ordinary tensor, fit for autograd
            new = decoder.step().clone()
        yield new, decoder.stats


def generate(model: Transformer, tokens: torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, speculative: bool = False,
             draft_depth: int | None = None, generator: torch.Generator | None = None,
             stop_token: int | None = None) -> tuple[torch.Tensor, GenerationStats]:
    """Continue each prompt in `tokens` (B, P) by `max_new_tokens`
    tokens with the KV cache.

    temperature 0 is greedy; > 0 samples from softmax(logits / temperature),
    restricted to the `top_k` most likely tokens and to the nucleus of probability
    `top_p` when given, using `generator`. speculative=True drafts `draft_depth`
    tokens (default: all MTP depths) per main-model forward. With a `stop_token`,
    decoding ends once every sequence has produced it, and a sequence's tokens
    after it are `stop_token` too. Logits that are not finite raise a
    `FloatingPointError`. Returns the sequences (B, P + new tokens), prompts
    included, and a `GenerationStats`.
    """
    pieces, stats = [tokens], None
    for new, stats in stream(model, tokens, max_new_tokens, temperature, top_k,
                             top_p, speculative, draft_depth, generator,
                             stop_token):
        pieces.append(new)
    return torch.cat(pieces, dim=1), stats


def _speculative_step(model: Transformer, drafter: _Drafter, seq: torch.Tensor,
                      n: int, depth: int,
                      sampling: tuple[float, int | None, float | None],
                      generator: torch.Generator | None,
                      stats: GenerationStats, active: torch.Tensor,
                      stop_token: int | None) -> int:
    """Draft `depth` tokens, verify them in one main-model forward, commit;
    return the new token count. Sequences not `active` (B,) have stopped: they
    neither count in the statistics nor hold the batch back; nor do the drafts
    after an accepted stop token."""
    temperature = sampling[0]
    drafts, draft_probs = drafter.draft(seq, n, depth, sampling, generator)
    # [last committed token, drafts]
    h, _ = model.hidden_states(seq[:, n - 1:n + depth], n - 1)
    drafter.hidden[0][:, n - 1:n + depth] = h
    target = restrict(_finite(model.head(h), n), *sampling)
    n_accepted, next_token = verify_drafts(target, drafts, draft_probs, temperature,
                                           generator)
    if stop_token is not None and depth:  # nothing after a stop token matters
        stops = (drafts == stop_token).long()
        first = torch.where(stops.any(1), stops.argmax(1) + 1, depth)
        n_accepted = torch.minimum(n_accepted, first)
    if depth:
        stats.draft_positions.append(n)
        stats.accepted_per_step.append(torch.where(active, n_accepted, -1))
        stats.drafts.append(drafts.clone())
        for k in range(depth):
            stats.drafted[k] += int(((n_accepted >= k) & active).sum())
            stats.accepted[k] += int(((n_accepted >= k + 1) & active).sum())
    # The batch keeps its active sequences' shortest accepted prefix a. A sequence
    # that accepted more keeps its accepted draft at index a (a correct sample too);
    # the others take their correction / bonus token.
    a = int(n_accepted[active].min())
    seq[:, n + a] = torch.where(n_accepted == a, next_token,
                                seq[:, n + a] if a < depth else next_token)
    return n + a + 1


@dataclass
class SpeedComparison:
    """Greedy decoding of the same prompts, plain and speculative
    (see `compare_decoding`)."""

    acceptance_rate: float          # acceptance of the first draft, over all prompts
    acceptance_by_depth: list[float]
    tokens_per_forward: float       # new tokens per main-model forward, speculative
    plain_tokens_per_second: float
    speculative_tokens_per_second: float

    @property
    def speedup(self) -> float:
        """Wall-clock tokens per second, speculative over plain."""
        return self.speculative_tokens_per_second / self.plain_tokens_per_second


def compare_decoding(model: Transformer, prompts: torch.Tensor, max_new_tokens: int,
                     draft_depth: int | None = None,
                     repeats: int = 3) -> SpeedComparison:
    """Decode each prompt (one row of `prompts`) alone, greedily, plain
    and speculative; keep each prompt's fastest of `repeats` runs of both
    (timings on a shared machine only ever err upwards). Also checks that both
    produce the same tokens."""
    if repeats < 1:
        raise ValueError(f"repeats ({repeats}) must be >= 1")
    plain_s = spec_s = 0.0
    forwards, drafted, accepted = 0, None, None
    for prompt in prompts:
        prompt = prompt[None]
        plain = [generate(model, prompt, max_new_tokens) for _ in range(repeats)]
        spec = [generate(model, prompt, max_new_tokens, speculative=True,
                         draft_depth=draft_depth) for _ in range(repeats)]
        if not torch.equal(plain[0][0], spec[0][0]):
            raise RuntimeError("speculative greedy decoding diverged from plain "
                               "greedy decoding")
        plain_s += min(s.seconds for _, s in plain)
        spec_s += min(s.seconds for _, s in spec)
        stats = spec[0][1]
        forwards += stats.main_forwards
        drafted = (stats.drafted if drafted is None
                   else [a + b for a, b in zip(drafted, stats.drafted)])
        accepted = (stats.accepted if accepted is None
                    else [a + b for a, b in zip(accepted, stats.accepted)])
    by_depth = _ratios(accepted, drafted)
    new = len(prompts) * max_new_tokens
    return SpeedComparison(by_depth[0], by_depth, new / forwards, new / plain_s,
                           new / spec_s)


__all__ = ["generate", "stream", "restrict", "verify_drafts", "GenerationStats",
           "compare_decoding", "SpeedComparison"]
