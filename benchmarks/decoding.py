"""Decoding with a trained checkpoint (chapter 8): answers, MTP acceptance and tokens/s, beside transformers.

    python benchmarks/decoding.py                                  # the book's checkpoint, one CPU thread
    python benchmarks/decoding.py --checkpoint runs/tiny --questions 100 --reps 5

Two parts, on the checkpoint's own weights:

1. Answers: `--questions` held-out arithmetic questions (`dsv3_lite.data.held_out_questions`, none of them in
   the training corpus), each decoded alone and greedily until end of text, plainly and with 1 and (when the
   model has two MTP modules) 2 drafts per step. Prints the accuracy of the final "#### <number>", whether
   the answers are identical in every mode (they must be: greedy speculative decoding is exact), the
   acceptance of each draft depth beside the report's 85-90% for the second token (report 5.4.3), and the
   tokens per main-model forward.
2. Speed: greedy decoding of exactly `--new-tokens` tokens (no early stop, so every row decodes the same
   number) after the first `--prompts` questions: ours plain, speculative with 1 and 2 drafts, and a batch
   of `--batch` same-length questions; transformers' `DeepseekV3ForCausalLM.generate` on the same weights
   (`dsv3_lite.hf.to_hf`), at batch 1 and `--batch`, with each attention and experts implementation, its
   fastest named. Each figure is the fastest of `--reps` calls in CPU time (which does not grow when other
   programs share the cores), the candidates called in turn. Also checks that transformers' greedy tokens
   equal ours. Part 2 repeats `--runs` times (default 3) and closes with the median and range over the runs of
   each figure, with the machine it ran on (the book quotes these).

The speculative speed-up is tokens per forward times (a plain step's time / a speculative step's time): a
speculative step adds the MTP blocks and a main-model forward over 1 + D tokens, so the speed-up approaches
tokens per forward only when the main stack is deep next to one MTP block.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from vs_transformers import SETTINGS, positive_int, set_hf_impl  # noqa: E402

from dsv3_lite.checkpoint import BOOK_CHECKPOINT  # noqa: E402
from dsv3_lite.client import Client  # noqa: E402
from dsv3_lite.data import QUESTION, build_documents, final_answer, held_out_questions  # noqa: E402
from dsv3_lite.generate import generate  # noqa: E402
from dsv3_lite.hf import to_hf  # noqa: E402
from dsv3_lite.timing import best_of, machine, spread  # noqa: E402

def answers(client: Client, questions, depth: int) -> tuple[list[str], list[int], list[int], int, int]:
    """Greedy answers to each question alone (depth 0: plain); the drafts checked and accepted per depth,
    the new tokens (the end-of-text token included) and main-model forwards, summed over the questions."""
    texts, drafted, accepted, new, forwards = [], [0] * depth, [0] * depth, 0, 0
    for question, _ in questions:
        result = client.generate(text=question, speculative=depth > 0, draft_depth=depth or None)
        stats = result["stats"]
        texts.append(result["generated_text"])
        if depth:
            drafted = [a + b for a, b in zip(drafted, stats["drafted"])]
            accepted = [a + b for a, b in zip(accepted, stats["accepted"])]
        new += stats["generated_tokens"] + (stats["finish_reason"] == "stop")
        forwards += stats["main_forwards"]
    return texts, drafted, accepted, new, forwards


def part_answers(client: Client, questions) -> None:
    print(f"\n1. {len(questions)} held-out questions, each alone, greedy until end of text")
    print(f"{'decoding':<16s} {'correct':>8s} {'acceptance per depth':>22s} {'tokens/forward':>15s}")
    reference = None
    for depth in range(len(client.model.mtp) + 1):
        texts, drafted, accepted, new, forwards = answers(client, questions, depth)
        correct = sum(final_answer(t) == a for t, (_, a) in zip(texts, questions))
        rates = " / ".join(f"{a / d:.1%}" for a, d in zip(accepted, drafted)) or "-"
        name = f"speculative D={depth}" if depth else "plain"
        print(f"{name:<16s} {correct:>4d}/{len(questions):<3d} {rates:>22s} {new / forwards:>15.3f}")
        if reference is None:
            reference = texts
        elif texts != reference:
            diff = sum(a != b for a, b in zip(texts, reference))
            sys.exit(f"FAIL: speculative D={depth} changed {diff} greedy answers")
    print("identical answers in every mode: True; the report's acceptance of the second-token draft: 85-90%")


def same_length(tokenizer, questions, batch: int) -> torch.Tensor:
    """`batch` question prompts of one length in tokens (the most common length)."""
    by_length: dict[int, list[list[int]]] = {}
    for question, _ in questions:
        ids = tokenizer.encode(QUESTION.format(text=question))
        by_length.setdefault(len(ids), []).append(ids)
    rows = max(by_length.values(), key=len)
    if len(rows) < batch:
        sys.exit(f"only {len(rows)} questions share a length: lower --batch or raise --questions")
    return torch.tensor(rows[:batch])


def speed_run(model, tokenizer, questions, opts) -> dict[tuple[str, int], tuple[float, float, float]]:
    """One run of part 2: {(decoding, batch): (tokens/s, vs plain, vs transformers' fastest)}."""
    hf = to_hf(model)
    hf.generation_config.eos_token_id = None  # both sides decode exactly new_tokens tokens
    hf.generation_config.pad_token_id = tokenizer.eot_id
    new = opts.new_tokens
    prompts = [torch.tensor([tokenizer.encode(QUESTION.format(text=q))]) for q, _ in questions[:opts.prompts]]
    batched = same_length(tokenizer, questions, opts.batch)
    out: dict[str, torch.Tensor] = {}

    def ours(prompt, depth=0):
        def call():
            out["ours" if not depth else f"D={depth}"] = generate(
                model, prompt, new, speculative=depth > 0, draft_depth=depth or None)[0]
        return call

    def theirs(prompt, setting):
        def call():
            with torch.no_grad():
                out[setting] = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                           use_cache=True, max_new_tokens=new)
        return call

    def setup(name: str) -> None:
        if name in SETTINGS:
            set_hf_impl(hf, name)

    def run(prompt) -> dict[str, float]:
        calls = {"plain": ours(prompt)}
        calls.update({f"speculative D={d}": ours(prompt, d) for d in range(1, len(model.mtp) + 1)})
        calls.update({s: theirs(prompt, s) for s in SETTINGS})
        seconds = best_of(calls, opts.reps, clock=time.process_time, setup=setup)
        for name in list(out):
            if not torch.equal(out[name], out["ours"]):
                sys.exit(f"FAIL: {name} decoded other greedy tokens than ours")
        return seconds

    single = [run(p) for p in prompts]
    measured = [(1, len(prompts), {name: sum(s[name] for s in single) for name in single[0]}),
                (opts.batch, opts.batch, run(batched))]
    print(f"{'decoding':<34s} {'batch':>5s} {'tokens/s':>9s} {'vs plain':>8s} {'vs transformers':>15s}")
    figures = {}
    for batch, sequences, seconds in measured:
        speed = {name: sequences * new / s for name, s in seconds.items()}
        fastest = max(SETTINGS, key=speed.get)
        for name in [n for n in speed if n not in SETTINGS] + [fastest]:
            label = f"transformers {name}" if name in SETTINGS else name
            print(f"{label:<34s} {batch:>5d} {speed[name]:>9.0f} {speed[name] / speed['plain']:>7.2f}x "
                  f"{speed[name] / speed[fastest]:>14.2f}x")
            key = "transformers (fastest)" if name in SETTINGS else name
            figures[key, batch] = (speed[name], speed[name] / speed["plain"], speed[name] / speed[fastest])
    print("transformers per setting (attention/experts), tokens/s at batch 1 and "
          f"{opts.batch}: " + "; ".join(
              f"{s} " + " / ".join(f"{n * new / seconds[s]:.0f}" for _, n, seconds in measured)
              for s in SETTINGS))
    print("greedy tokens identical to transformers' in every setting: True")
    return figures


def part_speed(model, tokenizer, questions, opts) -> None:
    """Part 2, `--runs` times, then each figure's median and range over the runs."""
    runs = []
    for run in range(1, opts.runs + 1):
        print(f"\n2. run {run}: greedy decoding of {opts.new_tokens} tokens; fastest of {opts.reps} in CPU time, "
              f"{torch.get_num_threads()} thread(s)")
        runs.append(speed_run(model, tokenizer, questions, opts))
    print(f"\nmedian [min, max] over {opts.runs} run(s) ({machine()})")
    for key in runs[0]:
        name, batch = key
        values = [[r[key][i] for r in runs] for i in range(3)]
        print(f"{name:<22s} batch {batch:<2d} {spread(values[0], ',.0f'):>17s} tokens/s, vs plain "
              f"{spread(values[1])}, vs transformers {spread(values[2])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=pathlib.Path, default=BOOK_CHECKPOINT,
                        help="default: the book's checkpoint, dsv3_lite/checkpoints/tiny8")
    parser.add_argument("--questions", type=positive_int, default=100, help="held-out questions in part 1")
    parser.add_argument("--prompts", type=positive_int, default=8, help="questions timed one at a time in part 2")
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--reps", type=positive_int, default=3, help="timed calls each; the fastest counts")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--runs", type=positive_int, default=3, help="repeats of part 2; median and range")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    client = Client(opts.checkpoint)
    model, tokenizer = client.model, client.tokenizer
    a = model.args
    print(f"machine: {machine()}")
    print(f"{opts.checkpoint.name}: {a.n_layers} layers, dim {a.dim}, {a.n_routed_experts} routed experts (top "
          f"{a.n_activated_experts}), {len(model.mtp)} MTP modules, vocab {a.vocab_size}; "
          f"{model.num_params(mtp=True):,d} parameters; torch {torch.__version__}")
    data = json.loads((opts.checkpoint / "config.json").read_text(encoding="utf-8"))["data"]
    questions = held_out_questions(opts.questions, seed=1, exclude=build_documents(**_corpus(data)))
    start = time.perf_counter()
    part_answers(client, questions)
    part_speed(model, tokenizer, questions, opts)
    print(f"\n({time.perf_counter() - start:.0f} s)")


def _corpus(data: dict) -> dict:
    """build_documents' arguments for the corpus the checkpoint was trained on."""
    if data.get("text") or "docs_per_domain" not in data:
        sys.exit("the checkpoint was not trained on the book's corpus, so its held-out questions are unknown")
    return {"docs_per_domain": data["docs_per_domain"]}


if __name__ == "__main__":
    main()
