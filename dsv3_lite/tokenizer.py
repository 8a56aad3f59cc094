"""Byte-level BPE, the kind of tokenizer DeepSeek-V3 uses (report 4.1), at toy size.

Hugging Face `tokenizers` learns the merges and does the encoding; this module
fixes the set-up and gives it the interface of `dsv3_lite.data.ByteTokenizer`
(`encode`, `decode`, `eot_id`, `special_id`, `vocab_size`):

- the 256 byte values are the base alphabet, so any text (Chinese, emoji, code)
  encodes, and decodes back exactly;
- text is split into words before merging (GPT-2's rule: letters, digits,
  punctuation and spaces apart), and every digit stands alone, so a number is
  read digit by digit;
- the special tokens: end of text, the three fill-in-the-middle markers (report
  4.1) and the chat roles. A special token's name inside ordinary text is encoded
  as ordinary characters, never as the special token.

V3's vocabulary has 128K tokens (129,280 rows in its embedding); the book's corpus
is small and repetitive enough for about a thousand.
"""
from __future__ import annotations

import numbers
import pathlib
import re
from typing import Iterable, Iterator, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>",
                  "<|fim_suffix|>", "<|user|>", "<|assistant|>")
LONGEST_RUN = 1000  # characters without a space that merges are learned from
_LONG_RUN = re.compile(rf"(\S{{{LONGEST_RUN}}})")


def _bounded(texts: Iterable[str]) -> Iterator[str]:
    """`texts` with every run of more than LONGEST_RUN non-space characters cut
    into pieces of at most that many, given to the trainer apart."""
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise TypeError("texts must be an iterable of str (one text per document), "
                        f"got {type(texts).__name__}")
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be str, got {type(text).__name__}")
        yield from (piece for piece in _LONG_RUN.split(text) if piece)


class BPETokenizer:
    """A byte-level BPE tokenizer: `BPETokenizer.train(texts, vocab_size)` learns
    one, `save` / `load` keep it as a `tokenizer.json` (Hugging Face's format, so
    `tokenizers.Tokenizer.from_file` and transformers read it too)."""

    def __init__(self, tokenizer: Tokenizer):
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"the tokenizer lacks the special tokens {missing}")
        # Special tokens come only from their ids, never from text (not saved in
        # tokenizer.json, so set here on every load).
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.eot_id = self.special_id("<|endoftext|>")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int,
              progress: bool = False) -> "BPETokenizer":
        """Learn merges from `texts` until the vocabulary (256 bytes, the special
        tokens and the merged tokens) has `vocab_size` tokens, or no pair of tokens
        occurs twice any more (then it is smaller). Deterministic. Merges are learned
        from at most LONGEST_RUN characters without a space at a time: the trainer's
        time grows with the square of a word's length (a word of 300,000 letters
        takes half a minute, one ten times longer most of an hour). `progress` shows
        the trainer's progress bars."""
        smallest = 256 + len(SPECIAL_TOKENS)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got "
                            f"{type(vocab_size).__name__}")
        if vocab_size < smallest:
            raise ValueError(f"vocab_size ({vocab_size}) must be >= {smallest}: "
                             f"256 bytes + {len(SPECIAL_TOKENS)} special tokens")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress)
        tokenizer.train_from_iterator(_bounded(texts), trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "BPETokenizer":
        """Read a `tokenizer.json` written by `save`."""
        path = pathlib.Path(path)
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as err:  # tokenizers raises a bare Exception
            if not path.is_file():
                raise FileNotFoundError(f"no tokenizer file at {path}") from None
            raise ValueError(f"{path} is not a valid tokenizer.json (truncated or "
                             f"corrupt?): {err}") from None

    def save(self, path: str | pathlib.Path) -> None:
        self.tokenizer.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def special_id(self, name: str) -> int:
        """Id of a special token, e.g. special_id("<|fim_prefix|>")."""
        if name not in SPECIAL_TOKENS:
            raise ValueError(f"unknown special token {name!r}; known: "
                             f"{SPECIAL_TOKENS}")
        return self.tokenizer.token_to_id(name)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        try:
            return self.tokenizer.encode(text).ids
        except TypeError:  # tokenizers refuses what is not valid UTF-8
            raise ValueError("text holds a lone surrogate (a half of a UTF-16 pair, "
                             "e.g. from text decoded with errors='surrogateescape'), "
                             "which is not UTF-8 text") from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of many texts at once (in parallel threads)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Tokens back to text (bytes that are not valid UTF-8 become U+FFFD);
        special tokens are written by name."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or any(
                isinstance(i, bool) or not isinstance(i, numbers.Integral)
                for i in ids):
            raise TypeError("ids must be a sequence of int token ids or a tensor, "
                            f"got {type(ids).__name__} {str(ids)[:40]}")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, "
                             f"{self.vocab_size})")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def pieces(self, text: str) -> list[str]:
        """The text of each token of `text` (a token that ends inside a UTF-8
        character shows U+FFFD), to see where the merges cut."""
        return [self.decode([i]) for i in self.encode(text)]

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size:,})"


__all__ = ["BPETokenizer", "SPECIAL_TOKENS"]
