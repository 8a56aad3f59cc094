"""Pipeline schedules: the report's Table 2 and each schedule's step time from the simulator, and real
multi-process runs checked against a single process (chapter 6).

    python benchmarks/pipeline.py                          # F=1, B=2, W=1, F&B=F+B; PP 4 8 16; real runs
    python benchmarks/pipeline.py --f 1 --b 2 --w 0.5 --fb 2.5 --p2p 0.1 --all-to-all 0.5 --no-real
    python benchmarks/pipeline.py --quick                  # PP 4 and 8, simulation only (a few seconds)

Part 1 simulates 1F1B, ZB1P, DualPipe and DualPipeV (PP stages on PP/2 ranks) for each PP with 2.5 PP
micro-batches (Figure 5's 20 at PP = 8) and prints, per method, the worst rank's bubble beside the Table 2
formula, the peak of activations held (in chunks of one micro-batch at one stage) and the stage copies per
rank. The formulas hold when F = B - W, W <= F, B <= F&B <= F + B and messages take no time; other costs
show where they stop holding. Part 2 prints the step time of the same work under each schedule, without
and with an all-to-all time (--all-to-all, default 1: about the chunk's computation, report 3.2.1) that a
chunk run alone waits for and an overlapped F&B pair hides; "rank-time" is the step times the ranks used.
Part 3 runs the four schedules for real (gloo, spawned processes: 4 for 1F1B, ZB1P and DualPipe, 2 for
DualPipeV) on float64 blocks and compares each step with one process.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from dsv3_lite.pipeline import (METHODS, Costs, Workload, build, compare, reference_step, report,
                                run_spawned, simulate, table2_bubble)


def micro_batches(pp: int) -> int:
    return 2 * round(1.25 * pp)


def ranks_of(method: str, pp: int) -> int:
    return pp // 2 if method == "DualPipeV" else pp


def table2(costs: Costs, pps: list[int]) -> None:
    print(f"costs: F {costs.f:g}, B {costs.b:g}, W {costs.w:g}, F&B {costs.f_and_b:g}, p2p {costs.p2p:g}, "
          f"all-to-all {costs.all_to_all:g}")
    print(f"{'method':10s} {'PP':>3s} {'ranks':>5s} {'micro':>5s} {'bubble':>8s} {'formula':>8s} "
          f"{'match':>6s} {'activations':>11s} {'params':>6s}")
    for pp in pps:
        for method in METHODS:
            timeline = simulate(build(method, ranks_of(method, pp), micro_batches(pp)), costs)
            bubble, formula = max(timeline.bubble), table2_bubble(method, pp, costs)
            match = abs(bubble - formula) < 1e-9
            print(f"{method:10s} {pp:>3d} {ranks_of(method, pp):>5d} {micro_batches(pp):>5d} "
                  f"{bubble:>8.3g} {formula:>8.3g} {'yes' if match else 'NO':>6s} "
                  f"{max(timeline.peak_activations):>11d} {max(timeline.parameter_copies):>5d}x")


def step_times(costs: Costs, all_to_all: float, pps: list[int]) -> None:
    with_a2a = dataclasses.replace(costs, all_to_all=all_to_all)
    print(f"step time of the same work: all-to-all {costs.all_to_all:g} vs {all_to_all:g} per chunk "
          "(hidden inside F&B)")
    print(f"{'method':10s} {'PP':>3s} {'ranks':>5s} {'micro':>5s} {'step':>7s} {'step':>7s} "
          f"{'rank-time':>9s} {'rank-time':>9s}")
    print(f"{'':10s} {'':>3s} {'':>5s} {'':>5s} {'a2a ' + f'{costs.all_to_all:g}':>7s} "
          f"{'a2a ' + f'{all_to_all:g}':>7s} {'a2a ' + f'{costs.all_to_all:g}':>9s} "
          f"{'a2a ' + f'{all_to_all:g}':>9s}")
    for pp in pps:
        for method in METHODS:
            ranks = ranks_of(method, pp)
            schedule = build(method, ranks, micro_batches(pp))
            steps = [simulate(schedule, c).makespan for c in (costs, with_a2a)]
            print(f"{method:10s} {pp:>3d} {ranks:>5d} {micro_batches(pp):>5d} {steps[0]:>7.4g} "
                  f"{steps[1]:>7.4g} {steps[0] * ranks:>9.4g} {steps[1] * ranks:>9.4g}")


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
    parser.add_argument("--all-to-all", type=float, default=1.0,
                        help="all-to-all time per chunk of part 2's second column (part 1 uses none)")
    parser.add_argument("--no-real", action="store_true", help="skip the multi-process runs")
    parser.add_argument("--quick", action="store_true", help="PP 4 and 8, no multi-process runs")
    parser.add_argument("--stages", type=int, default=4, help="stages of the real runs")
    parser.add_argument("--micro-batches", type=int, default=8, help="micro-batches of the real runs")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before the real runs fail")
    opts = parser.parse_args()
    if opts.quick:
        opts.pp, opts.no_real = [4, 8], True
    print("command:", " ".join(["python benchmarks/pipeline.py", *sys.argv[1:]]))
    print(f"torch {torch.__version__}")
    costs = Costs(opts.f, opts.b, opts.w, opts.fb, opts.p2p)
    table2(costs, opts.pp)
    print()
    step_times(costs, opts.all_to_all, opts.pp)
    if opts.no_real:
        return 0
    print()
    return 0 if real_runs(opts.stages, opts.micro_batches, opts.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
