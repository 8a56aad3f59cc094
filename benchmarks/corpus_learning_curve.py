"""Is the default corpus big enough? Train the tiny DeepSeek-V3 on it and print the validation loss curve.

    python benchmarks/corpus_learning_curve.py                       # 4000 steps, batch 16 x 128 tokens
    python benchmarks/corpus_learning_curve.py --steps 1000 --eval-every 100 --threads 2

The corpus should keep a tiny model learning for a few thousand steps: the validation loss should still be
falling at the end, not flatten out early (too little text to learn from) or turn up (memorizing the train
split). The unigram entropy of the validation bytes is printed as the baseline a model with no context
reaches. Each row also gives the loss per domain (English, Chinese, arithmetic, code) and the seconds
since the start (for this machine).
"""
from __future__ import annotations

import argparse
import time

import torch

from dsv3_lite.config import ModelArgs
from dsv3_lite.data import Corpus
from dsv3_lite.model import Transformer
from dsv3_lite.train import TrainingLoss, evaluate, train_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--text", help="train on this local UTF-8 text file instead of the default corpus")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    opts = parser.parse_args()
    if opts.steps < 1 or opts.eval_every < 1:
        parser.error(f"--steps ({opts.steps}) and --eval-every ({opts.eval_every}) must be >= 1")
    if opts.threads:
        torch.set_num_threads(opts.threads)

    corpus = Corpus.from_text_file(opts.text) if opts.text else Corpus.default()
    args = ModelArgs.tiny(mtp_depth=0)
    torch.manual_seed(0)
    model = Transformer(args)
    print(f"corpus: {corpus.train.numel():,} train / {corpus.val.numel():,} val tokens; "
          f"model: {model.num_params():,} parameters ({args.num_activated_params():,} activated)")
    print(f"unigram entropy of the validation split: {corpus.unigram_entropy('val'):.3f} nats/token")

    print(f"{'step':>6} {'val loss':>9} " + " ".join(f"{d:>10}" for d in corpus.domains) + f" {'seconds':>8}")
    start = time.perf_counter()

    loss = TrainingLoss()

    def report(model: Transformer, step: int) -> None:
        loss.update_bias(model, step)  # auxiliary-loss-free balancing, as in training the real model
        if (step + 1) % opts.eval_every and step + 1 != opts.steps:
            return
        val, per_domain = evaluate(model, corpus, "val", opts.batch, opts.seq_len, by_domain=True)
        print(f"{step + 1:>6} {val:>9.3f} " + " ".join(f"{per_domain[d]:>10.3f}" for d in corpus.domains)
              + f" {time.perf_counter() - start:>8.0f}", flush=True)

    train_lm(model, corpus, opts.steps, opts.batch, opts.seq_len, lr=opts.lr, loss_fn=loss, on_step=report,
             progress=False)


if __name__ == "__main__":
    main()
