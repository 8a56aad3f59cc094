"""Chat with a trained checkpoint in the terminal.

    python -m dsv3_lite.chat --checkpoint runs/tiny
    python -m dsv3_lite.chat --book --speculative  # the book's, with MTP drafts

Reads a question per line, prints the answer as it is decoded, and loops until
`q` (or the end of the input). With --speculative, the MTP modules draft tokens
that one main-model forward checks; each answer is followed by the number of
drafts accepted at every step. Questions read from a pipe are echoed, so a
scripted session reads like a typed one:

    printf 'What is 35 * 9?\\nq\\n' | python -m dsv3_lite.chat --checkpoint runs/tiny
"""
from __future__ import annotations

import argparse
import io
import pathlib
import sys
import unicodedata

from dsv3_lite.checkpoint import BOOK_CHECKPOINT
from dsv3_lite.client import Client

TRAIN_COMMAND = "python -m dsv3_lite.train --preset tiny --out runs/tiny"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dsv3_lite.chat",
        description="Ask a trained dsv3_lite checkpoint questions; q or end of "
                    "input quits.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=pathlib.Path,
                        help="checkpoint folder (from python -m dsv3_lite.train)")
    source.add_argument("--book", action="store_true",
                        help="the checkpoint that ships with the package "
                             "(chapter 8)")
    parser.add_argument("--speculative", action="store_true",
                        help="draft with the MTP modules and show the drafts "
                             "accepted per step")
    parser.add_argument("--max-new-tokens", type=int,
                        help="default: as many as the model's max_seq_len allows")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default) answers greedily")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, help="for sampling (temperature > 0)")
    parser.add_argument("--raw", action="store_true",
                        help="continue the text as typed instead of asking it as a "
                             "question")
    return parser


HOW = (f"Train one (about 10 minutes on a laptop CPU):\n  {TRAIN_COMMAND}\n"
       "then run: python -m dsv3_lite.chat --checkpoint runs/tiny\n"
       "or chat with the book's trained checkpoint: python -m dsv3_lite.chat --book")


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    if opts.book:
        opts.checkpoint = BOOK_CHECKPOINT
    if opts.checkpoint is None:
        print(f"error: no --checkpoint given. {HOW}", file=sys.stderr)
        return 2
    try:  # load_checkpoint names what is missing or broken
        client = Client(opts.checkpoint, prompt="{text}" if opts.raw else None)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}.\n{HOW}", file=sys.stderr)
        return 2
    options = dict(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                   top_k=opts.top_k, top_p=opts.top_p, seed=opts.seed,
                   speculative=opts.speculative)
    try:  # check the options once, before the first question
        client.stream("check", **options)
    except (TypeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # bytes that are not UTF-8 become U+FFFD instead of ending the session
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="replace")
    typed = sys.stdin.isatty()
    if typed:
        print(f"{opts.checkpoint.name}: ask a question; q quits.")
    try:
        return _loop(client, options, typed, opts.speculative)
    except KeyboardInterrupt:  # Ctrl-C ends the chat like q, without a traceback
        print()
        return 130


def _printable(text: str) -> str:
    """`text` with control characters other than newline and tab written as escapes
    (\\x1b), so that neither a question nor an answer can drive the terminal (ANSI
    escape sequences move the cursor, clear the screen, set the title)."""
    def shown(c: str) -> str:
        control = unicodedata.category(c) == "Cc" and c not in "\n\t"
        return repr(c)[1:-1] if control else c

    return "".join(map(shown, text))


def _loop(client: Client, options: dict, typed: bool, speculative: bool) -> int:
    """Question, streamed answer, until q or the end of the input."""
    while True:
        print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            print()
            return 0
        question = line.strip()
        if not typed:
            print(_printable(question))
        if question == "q":
            return 0
        if not question:
            continue
        try:
            answer = client.stream(question, **options)
        except ValueError as err:  # e.g. a question longer than the model reads
            print(f"error: {err}")
            continue
        for piece in answer:
            print(_printable(piece), end="", flush=True)
        print()
        if speculative:
            print(_drafts(answer.result["stats"]))


def _drafts(stats: dict) -> str:
    """One line on what the MTP drafts did for an answer."""
    steps, rate = stats["accepted_per_step"], stats["acceptance_rate"]
    return (f"[{stats['generated_tokens']} tokens in {stats['main_forwards']} "
            "forwards; drafts accepted per step: "
            f"{' '.join(map(str, steps)) or '-'}; acceptance "
            f"{'-' if rate is None else f'{rate:.0%}'}]")


if __name__ == "__main__":
    sys.exit(main())
