"""A trained checkpoint behind a client in the shape of a hosted model's API.

    client = Client("runs/tiny")
    client.generate(text="What is 35 * 9?")
    # {"generated_text": "Work: 30 * 9 = 270; ...\\n#### 315", "stats": {...}}
    for piece in client.stream(text="What is 35 * 9?"):
        print(piece, end="", flush=True)

A model trained on the book's corpus is a base model that has learned the corpus's
formats, so the client asks in the corpus's own words ("Question: ...\\n",
`dsv3_lite.data.QUESTION`) and the model answers with its worked steps and a final
"#### <number>". A checkpoint trained on other text gets the text as it is
(`prompt="{text}"` asks for that on any checkpoint).

Decoding (`dsv3_lite.generate`) is greedy by default, stops at the end-of-text
token, and with speculative=True drafts with the MTP modules: greedy answers are
then exactly the same, in fewer main-model forwards.
"""
from __future__ import annotations

import pathlib
from typing import Any, Iterator, Sequence

import torch
from tokenizers.decoders import DecodeStream

from dsv3_lite.checkpoint import load_checkpoint
from dsv3_lite.config import check_number
from dsv3_lite.data import QUESTION
from dsv3_lite.generate import GenerationStats, stream


class Client:
    """Answers text with a checkpoint saved by `dsv3_lite.checkpoint` (a training
    run's folder, or an inference copy without the trainer state)."""

    def __init__(self, checkpoint: str | pathlib.Path,
                 device: torch.device | str = "cpu", prompt: str | None = None):
        loaded = load_checkpoint(checkpoint, device)
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        book_corpus = "docs_per_domain" in loaded.data and not loaded.data.get("text")
        if prompt is None:
            prompt = QUESTION if book_corpus else "{text}"
        if "{text}" not in prompt:
            raise ValueError(f"prompt ({prompt!r}) must contain {{text}}, where the "
                             "text goes")
        self.prompt = prompt

    def generate(self, text: str | Sequence[str], max_new_tokens: int | None = None,
                 temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 stop: bool = True, speculative: bool = False,
                 draft_depth: int | None = None
                 ) -> dict[str, Any] | list[dict[str, Any]]:
        """Continue `text` (in the client's prompt); return {"generated_text": the
        new text, "stats": `stats` below}. A list of texts gives a list of such
        dicts; texts of the same length in tokens are decoded as one batch.

        temperature 0 decodes greedily; above 0 it samples, from the `top_k` most
        likely tokens and the nucleus `top_p` when given, with `seed` (a random one
        when None, reported in the stats: the same call with it draws the same
        answers; a list shares one random stream, in order of prompt length).
        stop=True ends at the end-of-text token; max_new_tokens (default: as many
        as the model's max_seq_len leaves after the prompt) bounds the answer
        either way. speculative=True drafts `draft_depth` tokens (default: every MTP
        depth) per main-model forward.
        """
        options = self._options(max_new_tokens, temperature, top_k, top_p, seed,
                                stop, speculative, draft_depth)
        if isinstance(text, str):
            return self._generate([self._encode(text)], options)[0]
        if not isinstance(text, Sequence) or not text:
            raise TypeError(f"text must be a str or a non-empty list of str, got "
                            f"{type(text).__name__}")
        prompts = [self._encode(t) for t in text]
        results: list[dict[str, Any] | None] = [None] * len(prompts)
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(prompts):
            by_length.setdefault(len(ids), []).append(i)
        size = self.model.args.max_batch_size
        for group in by_length.values():
            for lo in range(0, len(group), size):
                rows = group[lo:lo + size]
                done = self._generate([prompts[i] for i in rows], options)
                for i, result in zip(rows, done):
                    results[i] = result
        return results

    def stream(self, text: str, max_new_tokens: int | None = None,
               temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None,
               stop: bool = True, speculative: bool = False,
               draft_depth: int | None = None) -> "TextStream":
        """Like `generate` for one text, but iterating the returned `TextStream`
        yields the text of each main-model forward as soon as it is decoded (one
        token; with speculative=True, 1 + the drafts accepted). Its `result` is then
        what `generate` returns."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        options = self._options(max_new_tokens, temperature, top_k, top_p, seed,
                                stop, speculative, draft_depth)
        tokens = torch.tensor([self._encode(text)], device=self._device)
        steps = stream(self.model, tokens, **self._decode_args(tokens, options))
        return TextStream(steps, self.tokenizer, tokens.shape[1], options)

    # ---------------------------------------------------------------------- helpers
    @property
    def _device(self) -> torch.device:
        return self.model.embed.weight.device

    def _encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text is empty: give the question or text to continue")
        return self.tokenizer.encode(self.prompt.replace("{text}", text))

    def _decode_args(self, tokens: torch.Tensor, options: dict[str, Any]
                     ) -> dict[str, Any]:
        """The options `dsv3_lite.generate` takes (all but the seed), with the
        default max_new_tokens: what max_seq_len leaves after the prompt."""
        longest = self.model.args.max_seq_len
        room = longest - tokens.shape[1]
        if room < 1:
            raise ValueError(f"the prompt has {tokens.shape[1]} tokens, but the "
                             f"model reads at most max_seq_len ({longest}): shorten "
                             "the text")
        decode = {k: v for k, v in options.items() if k != "seed"}
        if decode["max_new_tokens"] is None:
            decode["max_new_tokens"] = room
        return decode

    def _options(self, max_new_tokens: int | None, temperature: float,
                 top_k: int | None, top_p: float | None, seed: int | None,
                 stop: bool, speculative: bool, draft_depth: int | None
                 ) -> dict[str, Any]:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not 0 <= seed < 2 ** 64):
            raise ValueError(f"seed ({seed!r}) must be an int in [0, 2**64), or None")
        if not isinstance(stop, bool):
            raise TypeError(f"stop must be True (end at the end-of-text token) or "
                            f"False, got {stop!r}: stop strings are not supported")
        check_number("temperature", temperature)  # compared with 0 below
        generator = torch.Generator(device=self._device)
        if temperature > 0:  # greedy decoding draws no random numbers
            seed = generator.seed() if seed is None else seed
            generator.manual_seed(seed)
        return dict(max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, seed=seed, generator=generator,
                    stop_token=self.tokenizer.eot_id if stop else None,
                    speculative=speculative, draft_depth=draft_depth)

    def _generate(self, prompts: list[list[int]], options: dict[str, Any]
                  ) -> list[dict[str, Any]]:
        """Decode prompts of one length as one batch."""
        tokens = torch.tensor(prompts, device=self._device)
        pieces, stats = [], None
        for new, stats in stream(self.model, tokens,
                                 **self._decode_args(tokens, options)):
            pieces.append(new)
        results = []
        for i, row in enumerate(torch.cat(pieces, dim=1).tolist()):
            ids, stopped = _until_stop(row, options["stop_token"])
            results.append(_result(self.tokenizer.decode(ids), len(ids), stopped,
                                   tokens.shape[1], stats, i, options))
        return results


class TextStream:
    """The text pieces of one decoding, one per main-model forward, as they are
    decoded; `result` holds {"generated_text", "stats"} once the stream is
    exhausted. Leaving the loop early ends the decoding (`result` stays None). A
    stream is iterated once."""

    def __init__(self, steps: Iterator[tuple[torch.Tensor, GenerationStats]],
                 tokenizer, prompt_tokens: int, options: dict[str, Any]):
        self._steps, self._tokenizer = steps, tokenizer
        self._prompt_tokens, self._options = prompt_tokens, options
        self._started = False
        self.result: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("this TextStream was already iterated: call "
                               "client.stream again for a new answer")
        self._started = True
        # DecodeStream holds back bytes that do not yet make a whole UTF-8
        # character (a Chinese character can span two tokens)
        decoder = DecodeStream(skip_special_tokens=False)
        text, count, stopped, stats = "", 0, False, None
        try:
            for new, stats in self._steps:
                ids, stopped = _until_stop(new[0].tolist(),
                                           self._options["stop_token"])
                count += len(ids)
                piece = "".join(decoder.step(self._tokenizer.tokenizer, token) or ""
                                for token in ids)
                text += piece
                if piece:
                    yield piece
        finally:  # also when the caller leaves early: free the model's cache now
            self._steps.close()
        self.result = _result(text, count, stopped, self._prompt_tokens, stats, 0,
                              self._options)


def _until_stop(ids: list[int], stop_token: int | None) -> tuple[list[int], bool]:
    """`ids` before the first stop token, and whether there was one."""
    if stop_token is None or stop_token not in ids:
        return ids, False
    return ids[:ids.index(stop_token)], True


def _result(text: str, generated_tokens: int, stopped: bool, prompt_tokens: int,
            stats: GenerationStats, row: int, options: dict[str, Any]
            ) -> dict[str, Any]:
    """The client's answer for sequence `row` of a batch. The drafts checked and
    accepted, per depth and per verify step, are the sequence's own; the forwards
    and the timing are the batch's (which advances by the fewest drafts any of its
    sequences accepted)."""
    speculative = options["speculative"]
    drafted, accepted = [0] * len(stats.drafted), [0] * len(stats.drafted)
    per_step = []
    for step, drafts in zip(stats.accepted_per_step, stats.drafts):
        kept = int(step[row])  # -1 once the sequence has stopped
        if kept >= 0:
            per_step.append(kept)
        for k in range(drafts.shape[1]):
            drafted[k] += kept >= k
            accepted[k] += kept >= k + 1
    return {
        "generated_text": text,
        "stats": {
            "finish_reason": "stop" if stopped else "length",
            "prompt_tokens": prompt_tokens,
            "generated_tokens": generated_tokens,  # the stop token not counted
            "main_forwards": stats.main_forwards,
            "tokens_per_forward": stats.tokens_per_forward,
            "drafted": drafted if speculative else None,
            "accepted": accepted if speculative else None,
            "acceptance_rate": (accepted[0] / drafted[0] if drafted[0] else None)
                               if speculative else None,
            "accepted_per_step": per_step if speculative else None,
            "seconds": stats.seconds,
            "tokens_per_second": stats.tokens_per_second,
            "seed": options["seed"],
        },
    }


__all__ = ["Client", "TextStream"]
