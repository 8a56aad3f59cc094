"""Pipeline schedules: the report's Table 2 from the simulator, and real multi-process runs checked against a
single process (chapter 6).

    python benchmarks/pipeline.py                          # F=1, B=2, W=1, F&B=F+B; PP 4 8 16; real runs
    python benchmarks/pipeline.py --f 1 --b 2 --w 0.5 --fb 2.5 --p2p 0.1 --no-real

Part 1 simulates 1F1B, ZB1P, DualPipe and DualPipeV (PP stages on PP/2 ranks) for each PP with 2.5 PP
micro-batches (Figure 5's 20 at PP = 8) and prints, per method, the worst rank's bubble beside the Table 2
formula, the peak of activations held (in chunks of one micro-batch at one stage) and the stage copies per
rank. The formulas hold when F = B - W, W <= F, B <= F&B <= F + B and messages take no time; other costs
show where they stop holding. Part 2 runs the four schedules for real (gloo, spawned processes: 4 for
1F1B, ZB1P and DualPipe, 2 for DualPipeV) on float64 blocks and compares each step with one process.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from dsv3_lite.pipeline import (METHODS, Costs, Workload, build, compare, reference_step, report,
                                run_spawned, simulate, table2_bubble)


def table2(costs: Costs, pps: list[int]) -> None:
    print(f"costs: F {costs.f:g}, B {costs.b:g}, W {costs.w:g}, F&B {costs.f_and_b:g}, p2p {costs.p2p:g}")
    print(f"{'method':10s} {'PP':>3s} {'ranks':>5s} {'micro':>5s} {'bubble':>8s} {'formula':>8s} "
          f"{'match':>6s} {'activations':>11s} {'params':>6s}")
    for pp in pps:
        n_micro = 2 * round(1.25 * pp)
        for method in METHODS:
            ranks = pp // 2 if method == "DualPipeV" else pp
            timeline = simulate(build(method, ranks, n_micro), costs)
            bubble, formula = max(timeline.bubble), table2_bubble(method, pp, costs)
            match = abs(bubble - formula) < 1e-9
            print(f"{method:10s} {pp:>3d} {ranks:>5d} {n_micro:>5d} {bubble:>8.3g} {formula:>8.3g} "
                  f"{'yes' if match else 'NO':>6s} {max(timeline.peak_activations):>11d} "
                  f"{max(timeline.parameter_copies):>5d}x")


def real_runs(n_stages: int, n_micro: int, timeout: float) -> bool:
    workload = Workload(n_stages=n_stages, n_micro_batches=n_micro)
    schedules = [build(m, n_stages // 2 if m == "DualPipeV" else n_stages, n_micro) for m in METHODS]
    start = time.perf_counter()
    results = run_spawned(schedules, workload, timeout=timeout)
    seconds = time.perf_counter() - start
    reference = reference_step(workload)
    agreements = [compare(r, reference) for r in results]
    print(f"{n_stages} stages of one float64 block (MLA + dense FFN), {n_micro} micro-batches of "
          f"{workload.micro_batch_size} x {workload.seq_len}; gloo; {seconds:.1f} s with process start-up")
    print(report(agreements, [s.n_ranks for s in schedules]))
    return all(a.losses_equal and a.max_grad_diff < 1e-13 for a in agreements)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, nargs="+", default=[4, 8, 16], help="pipeline stages (even)")
    parser.add_argument("--f", type=float, default=1.0, help="forward chunk")
    parser.add_argument("--b", type=float, default=2.0, help="full backward chunk")
    parser.add_argument("--w", type=float, default=1.0, help="weight part of the backward")
    parser.add_argument("--fb", type=float, default=None, help="overlapped F&B pair (default F + B)")
    parser.add_argument("--p2p", type=float, default=0.0, help="point-to-point latency")
    parser.add_argument("--no-real", action="store_true", help="skip the multi-process runs")
    parser.add_argument("--stages", type=int, default=4, help="stages of the real runs")
    parser.add_argument("--micro-batches", type=int, default=8, help="micro-batches of the real runs")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before the real runs fail")
    opts = parser.parse_args()
    print("command:", " ".join(["python benchmarks/pipeline.py", *sys.argv[1:]]))
    print(f"torch {torch.__version__}")
    table2(Costs(opts.f, opts.b, opts.w, opts.fb, opts.p2p), opts.pp)
    if opts.no_real:
        return 0
    print()
    return 0 if real_runs(opts.stages, opts.micro_batches, opts.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
