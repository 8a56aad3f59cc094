"""Pipeline schedules (dsv3_lite.pipeline): valid for many sizes, Table 2 reproduced by the simulator,
deadlocks named, and real multi-process runs that reproduce a single process's step."""
import collections
import itertools
import os
import subprocess
import sys

import pytest
import torch

from dsv3_lite.fp8 import calc_diff
from dsv3_lite.pipeline import (
    METHODS, Costs, Deadlock, Op, OverlapCosts, Pair, RankRunner, Workload, build, check_schedule,
    communication_hidden, compare, exposed_communication, ops_of, overlap_pair, peak_activations,
    reference_step, run_spawned, simulate, table2_bubble)

# A real run must finish well within this (it takes about 10 s on a busy 2-core machine): a hang fails.
REAL_RUN_TIMEOUT_S = 120


def sizes(method):
    """(ranks, micro-batches) for PP = 2..16 and several micro-batch counts each method accepts."""
    for pp in range(2, 17):
        if method in ("1F1B", "ZB1P"):
            yield from ((pp, m) for m in (1, pp - 1, pp, 2 * pp + 1))
        elif method == "DualPipe" and pp % 2 == 0:
            yield from ((pp, m) for m in (2 * pp, 2 * pp + 2, 3 * pp + pp % 4))
        elif method == "DualPipeV" and pp % 2 == 0:
            yield from ((pp // 2, m) for m in (pp, pp + 1, 2 * pp + 3))


CASES = [(method, n, m) for method in METHODS for n, m in sizes(method)]


# ----------------------------------------------------------------------------------------- valid schedules
@pytest.mark.parametrize("method,n_ranks,n_micro", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_every_chunk_runs_once_per_stage_in_dependency_order(method, n_ranks, n_micro):
    schedule = build(method, n_ranks, n_micro)
    assert schedule.n_micro_batches == n_micro
    counts, where = collections.Counter(), {}
    for rank, slots in enumerate(schedule.ranks):
        for position, slot in enumerate(slots):
            for op in ops_of(slot):
                counts[op.kind, op.chunk] += 1
                where[op.kind, op.chunk] = rank, position
                assert schedule.placement[op.direction, op.stage] == rank
    for d, ids in enumerate(schedule.micro_batches):
        for mb in ids:
            for stage in range(schedule.n_stages):
                chunk = mb, stage, d
                assert counts["F", chunk] == 1
                assert counts["B", chunk] + counts["BI", chunk] == 1
                assert counts["W", chunk] == counts["BI", chunk]
                backward = where.get(("B", chunk)) or where["BI", chunk]
                assert where["F", chunk] < backward  # same rank: compare positions
                if counts["W", chunk]:
                    assert backward < where["W", chunk]
    timeline = simulate(schedule)  # no deadlock
    assert len(timeline.intervals) == sum(len(r) for r in schedule.ranks)


def test_dualpipe_places_two_stages_per_rank_and_feeds_both_ends():
    schedule = build("DualPipe", 8, 20)
    assert schedule.stages_on(2) == [(0, 2), (1, 5)]
    first = [schedule.ranks[r][0] for r in (0, 7)]
    assert first == [Op("F", 0, 0, 0), Op("F", 10, 0, 1)]
    assert sum(isinstance(s, Pair) for s in schedule.ranks[0]) > 0
    v = build("DualPipeV", 4, 10)
    assert v.n_stages == 8 and v.stages_on(0) == [(0, 0), (0, 7)]


# The official DualPipe.step() (github.com/deepseek-ai/DualPipe) for PP = 4 and 8 micro-batches, written out
# by hand from its eight steps, with h = min(rank, 3 - rank), n = 2, C = 4 chunks per direction. Phase 0 is
# the stage at distance h from its input end: direction 0 (micro-batches 0-3) on ranks 0 and 1, direction 1
# (micro-batches 4-7) on ranks 2 and 3. Steps: 1 nF0 (2(n-h-1)), 2 nF0F1 (h+1), 3 nB1W1F1 with a split
# backward (n-h-1), 4 nF0B1F1B0 (C-PP+h+1; the middle ranks run the first F0 and B1 unpaired), 5 nB1F1B0
# (n-h-1), 6 nB1B0 (h+1; zero bubble from i = (h+1)//2, for B1 only when h is odd), 7 nWB0 (n-h-1),
# 8 nW (h+1). The weight-gradient queue is first in, first out: each W runs the oldest waiting BI's chunk.
OFFICIAL_DUALPIPE_4_8 = [
    "F0 F1 F2 F4 BI4 W4 F5 F3&B5 F6&B0 B6 F7&B1 B7 BI2 W2 BI3 W3",
    "F0 F4 F1 F5 F2 B4 F6&B0 F3&B5 F7&B1 B6 B2 BI7 BI3 W7 W3",
    "F4 F0 F5 F1 F6 B0 F2&B4 F7&B1 F3&B5 B2 B6 BI3 BI7 W3 W7",
    "F4 F5 F6 F0 BI0 W0 F1 F7&B1 F2&B4 B2 F3&B5 B3 BI6 W6 BI7 W7",
]


def test_dualpipe_matches_the_official_step_op_for_op():
    schedule = build("DualPipe", 4, 8)
    for rank, expected in enumerate(OFFICIAL_DUALPIPE_4_8):
        got = " ".join("&".join(f"{op.kind}{op.micro_batch}" for op in ops_of(slot))
                       for slot in schedule.ranks[rank])
        assert got == expected, f"rank {rank}"
        for slot in schedule.ranks[rank]:
            for op in ops_of(slot):  # micro-batches 0-3 go one way, 4-7 the other
                assert op.direction == (op.micro_batch >= 4)
                assert op.stage == (rank if op.direction == 0 else 3 - rank)


def as_dualpipe(slot, v, m):
    """A DualPipeV slot as the DualPipe(2V, 2m) slot it corresponds to: stages V..2V-1 are direction 1's,
    whose micro-batches are numbered m..2m-1."""
    def one(op):
        d = int(op.stage >= v)
        return op._replace(micro_batch=op.micro_batch + m * d, direction=d)
    return Pair(*map(one, slot)) if isinstance(slot, Pair) else one(slot)


@pytest.mark.parametrize("v", [1, 2, 3, 4])
def test_dualpipev_is_the_first_half_of_dualpipe_on_twice_the_ranks(v):
    """DualPipeV(V, m) runs, on each of its V ranks, the same ops (kinds and stages; micro-batch j of stage
    s >= V is DualPipe's j + m) in the same order as DualPipe(2V, 2m) on its first V ranks, and without
    latency the simulator starts and ends every one at the same times."""
    for m in (2 * v, 2 * v + 1, 3 * v + 2):
        folded, full = build("DualPipeV", v, m), build("DualPipe", 2 * v, 2 * m)
        assert [[as_dualpipe(s, v, m) for s in r] for r in folded.ranks] == [list(r) for r in full.ranks[:v]]
        for costs in (Costs(), Costs(1, 2, 1, fb=2.5, all_to_all=0.5), Costs(1.5, 2.5, 0.5)):
            a, b = simulate(folded, costs), simulate(full, costs)
            assert (sorted((i.rank, i.start, i.end, as_dualpipe(i.slot, v, m)) for i in a.intervals)
                    == sorted((i.rank, i.start, i.end, i.slot) for i in b.intervals if i.rank < v))
            assert a.makespan == b.makespan
        # with latency, DualPipe's middle ranks send across where DualPipeV's last rank hands over locally
        assert simulate(folded, Costs(p2p=0.1)).makespan < simulate(full, Costs(p2p=0.1)).makespan


@pytest.mark.parametrize("method,n_ranks,n_micro,rule", [
    ("DualPipe", 5, 20, "even number of ranks"),
    ("DualPipe", 4, 9, "even number of micro-batches"),
    ("DualPipe", 4, 6, r"at least 2 \* PP = 8"),
    ("DualPipeV", 3, 5, "as many micro-batches as stages"),
    ("1F1B", 0, 4, r"n_ranks \(0\) must be >= 1"),
    ("ZB1P", 4, 0, r"n_micro_batches \(0\) must be >= 1"),
    ("GPipe", 4, 8, "method must be one of"),
])
def test_bad_sizes_name_the_rule(method, n_ranks, n_micro, rule):
    with pytest.raises(ValueError, match=rule):
        build(method, n_ranks, n_micro)


def test_a_backward_swapped_before_its_forward_is_caught():
    schedule = build("1F1B", 4, 8)
    last = list(schedule.ranks[3])
    last[0], last[1] = last[1], last[0]  # B0 before F0 on the last stage
    with pytest.raises(ValueError, match=r"rank 3 runs B0 \(stage 3\) at slot 0, not after F0"):
        check_schedule(schedule.with_ranks([*schedule.ranks[:3], last]))


def test_a_swap_across_ranks_is_reported_as_a_deadlock_naming_the_waiting_ops():
    schedule = build("1F1B", 4, 8)
    first = list(schedule.ranks[0])
    first[2], first[4] = first[4], first[2]  # rank 0 now waits for B0 before sending F2
    with pytest.raises(Deadlock) as caught:
        simulate(schedule.with_ranks([first, *schedule.ranks[1:]]))
    message = str(caught.value)
    assert "ranks 0 -> 1 -> 0 wait on each other" in message
    assert "rank 0 waits at slot 2, B0 (stage 0), for B0 (stage 1): slot 3 of rank 1" in message
    assert "rank 1 waits at slot 2, F2 (stage 1), for F2 (stage 0): slot 4 of rank 0" in message
    assert (0, Op("B", 0, 0), Op("B", 0, 1), 1) in caught.value.waits


def test_dualpipe_swaps_are_caught_or_harmless():
    """Swapping two slots of a DualPipe rank, 1 to 3 places apart, either keeps a valid schedule (the
    simulator treats sends as asynchronous, so neighbours can often trade places) or is caught: as an
    order error on the rank, or as a deadlock between ranks."""
    schedule = build("DualPipe", 4, 8)
    outcomes = collections.Counter()
    for distance in (1, 2, 3):
        for rank in range(4):
            for i in range(len(schedule.ranks[rank]) - distance):
                slots = list(schedule.ranks[rank])
                slots[i], slots[i + distance] = slots[i + distance], slots[i]
                ranks = list(schedule.ranks)
                ranks[rank] = slots
                try:
                    simulate(schedule.with_ranks(ranks))
                    outcomes["valid"] += 1
                except Deadlock:
                    outcomes["deadlock"] += 1
                except ValueError:
                    outcomes["order"] += 1
    assert outcomes == {"valid": 80, "order": 66, "deadlock": 16}


def test_missing_and_misplaced_ops_are_caught():
    schedule = build("ZB1P", 4, 8)
    rank1 = list(schedule.ranks[1])
    w = rank1.pop()
    with pytest.raises(ValueError, match=f"{w.kind}{w.micro_batch} \\(stage 1\\) is missing"):
        check_schedule(schedule.with_ranks([schedule.ranks[0], rank1, *schedule.ranks[2:]]))
    moved = [list(r) for r in schedule.ranks]
    moved[0].append(moved[1].pop())
    with pytest.raises(ValueError, match="belongs on rank 1"):
        check_schedule(schedule.with_ranks(moved))


# --------------------------------------------------------------------------------------- Table 2
# The formulas hold when a forward chunk costs as much as the input part of a backward (F = B - W), a W is
# no longer than a forward (the zero-bubble paper's F = B_input = W, generalised), an overlapped pair costs
# between its backward and the sum of its two chunks (B <= F&B <= F + B), and messages take no time. The
# bubble is then the worst rank's idle time (with F&B < F + B the ranks' bubbles differ).
# An all-to-all time that unpaired chunks pay enters the formulas through F and B (a chunk's time as run).
FORMULA_COSTS = [Costs(1, 2, 1), Costs(1, 2, 1, fb=2.5), Costs(2, 3, 1), Costs(1.5, 2.5, 1, fb=3.0),
                 Costs(1, 1.5, 0.5, fb=1.5), Costs(1, 2, 1, all_to_all=0.5), Costs(1, 2, 1, fb=3.5, all_to_all=1)]


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("costs", FORMULA_COSTS, ids=str)
def test_simulated_bubble_equals_table_2(method, pp, costs):
    ranks = pp // 2 if method == "DualPipeV" else pp
    for n_micro in (2 * pp, 3 * pp):
        timeline = simulate(build(method, ranks, n_micro), costs)
        assert max(timeline.bubble) == pytest.approx(table2_bubble(method, pp, costs))


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("method,params,activations", [
    ("1F1B", 1, lambda pp: pp), ("ZB1P", 1, lambda pp: pp), ("DualPipe", 2, lambda pp: pp + 1),
    ("DualPipeV", 2, lambda pp: pp + 1)])
def test_parameters_and_activations_of_table_2(method, params, activations, pp):
    ranks = pp // 2 if method == "DualPipeV" else pp
    timeline = simulate(build(method, ranks, 2 * pp))
    assert set(timeline.parameter_copies) == {params}
    assert max(timeline.peak_activations) == activations(pp)


def test_1f1b_bubble_is_the_same_on_every_rank_and_independent_of_w():
    for w in (0.0, 0.5, 2.0):
        timeline = simulate(build("1F1B", 8, 20), Costs(1, 2, w))
        assert timeline.bubble == pytest.approx([7 * 3] * 8)


@pytest.mark.parametrize("method,costs", [
    ("ZB1P", Costs(1, 3, 1.5)),          # W > F: the deferred W chunks no longer fit in the bubbles
    ("DualPipe", Costs(2, 2, 1)),        # F > B - W
    ("DualPipe", Costs(1, 3, 1)),        # F < B - W: DualPipe does better than the formula
    ("DualPipe", Costs(1.5, 2.5, 1, fb=2)),  # F&B < B
])
def test_where_the_formulas_stop_holding(method, costs):
    timeline = simulate(build(method, 8, 24), costs)
    assert max(timeline.bubble) != pytest.approx(table2_bubble(method, 8, costs))


def test_latency_adds_to_every_bubble():
    for method in ("1F1B", "ZB1P", "DualPipe"):
        schedule = build(method, 8, 24)
        free, slow = simulate(schedule, Costs()), simulate(schedule, Costs(p2p=0.25))
        assert min(slow.bubble) > max(free.bubble) - 1e-9


def test_costs_are_validated():
    with pytest.raises(ValueError, match="w \\(3\\) must be <= b \\(2\\)"):
        Costs(1, 2, 3)
    with pytest.raises(ValueError, match="p2p"):
        Costs(p2p=-1)
    with pytest.raises(ValueError, match=r"all_to_all \(-0.5\) must be >= 0"):
        Costs(all_to_all=-0.5)
    assert Costs(1, 2, 1).f_and_b == 3 and Costs(1, 2, 1, fb=2).f_and_b == 2


def test_peak_activations_counts_until_the_weight_gradient():
    assert peak_activations([Op("F", 0, 0), Op("F", 1, 0), Op("B", 0, 0), Op("B", 1, 0)]) == 2
    split = [Op("F", 0, 0), Op("BI", 0, 0), Op("F", 1, 0), Op("W", 0, 0), Op("BI", 1, 0), Op("W", 1, 0)]
    assert peak_activations(split) == 2  # the BI keeps what the W still needs
    assert peak_activations([Op("F", 0, 0), Pair(Op("F", 1, 0), Op("B", 0, 0))]) == 2


# ----------------------------------------------------------------------- all-to-all: what F&B pairs hide
@pytest.mark.parametrize("method", METHODS)
def test_unpaired_chunks_pay_the_all_to_all_and_pairs_hide_it(method):
    """With all-to-all time c, an unpaired F, B or BI lasts c longer and W and F&B pairs do not change: the
    same timeline as chunk costs f + c, b + c, w with the pair's cost unchanged."""
    schedule = build(method, 2 if method == "DualPipeV" else 4, 8)
    for f, b, w, c in [(1, 2, 1, 1), (1.5, 2.5, 0.5, 0.75)]:
        with_a2a = simulate(schedule, Costs(f, b, w, all_to_all=c))
        shifted = simulate(schedule, Costs(f + c, b + c, w, fb=f + b))
        assert [iv[:3] for iv in with_a2a.intervals] == pytest.approx([iv[:3] for iv in shifted.intervals])
    assert simulate(schedule, Costs(1, 2, 1, all_to_all=0)) == simulate(schedule, Costs(1, 2, 1))


def test_the_overlap_shortens_dualpipes_step_below_the_others():
    """The same work (8 stages, 20 micro-batches): with no all-to-all DualPipe's step is about ZB1P's; with one,
    the F&B pairs hide it and DualPipe's step grows least. Without the overlap (a pair costing both chunks and
    both all-to-alls) the gain goes."""
    steps = {c: {m: simulate(build(m, 4 if m == "DualPipeV" else 8, 20), Costs(1, 2, 1, all_to_all=c)).makespan
                 for m in ("1F1B", "ZB1P", "DualPipe")} for c in (0.0, 0.5, 1.0)}
    assert steps[0.0]["DualPipe"] < steps[0.0]["ZB1P"] < steps[0.0]["1F1B"]
    for c in (0.5, 1.0):
        growth = {m: steps[c][m] - steps[0.0][m] for m in steps[c]}
        assert growth["DualPipe"] < growth["ZB1P"] <= growth["1F1B"]
    serial = simulate(build("DualPipe", 8, 20), Costs(1, 2, 1, fb=3 + 2 * 1.0, all_to_all=1.0)).makespan
    assert steps[1.0]["DualPipe"] < serial


def test_costs_from_the_overlap_model():
    parts = OverlapCosts(attn=0.5, mlp=0.5, dispatch=0.5, combine=0.5, pp=0.0)
    assert Costs.from_overlap(parts) == Costs(1, 2, 1, fb=3, all_to_all=1)
    for parts in (OverlapCosts(), OverlapCosts(1, 1, 2, 2, 0.0), OverlapCosts(1.6, 0.4, 1, 1, 0.0)):
        costs = Costs.from_overlap(parts, n_layers=3, p2p=0.1)
        assert costs.f_and_b == pytest.approx(max(s.end for s in overlap_pair(parts, n_layers=3)))
        serial = max(s.end for s in overlap_pair(parts, n_layers=3, overlap=False))
        unpaired = costs.of(Op("F", 0, 0)) + costs.of(Op("B", 0, 0))
        assert unpaired == pytest.approx(serial - 3 * parts.pp)  # pipeline sends: p2p's, not the chunk's
        assert costs.p2p == 0.1 and costs.w == costs.f and costs.b == 2 * costs.f


# ------------------------------------------------------------------------------- overlap inside a pair
def test_communication_is_hidden_when_each_all_to_all_fits_under_computation():
    spans = overlap_pair(OverlapCosts(attn=1, mlp=1, dispatch=0.8, combine=0.8, pp=0.2), n_layers=4)
    compute = sum(s.end - s.start for s in spans if s.stream == "compute")
    assert compute == pytest.approx(4 * 6)  # forward 1 + backward 2, for attention and MLP
    assert exposed_communication(spans) == pytest.approx(0)


def test_exposed_communication_grows_once_it_no_longer_fits():
    exposed = [exposed_communication(overlap_pair(OverlapCosts(dispatch=c, combine=c), n_layers=4))
               for c in (0.5, 1.0, 1.5, 2.5, 3.0)]
    assert exposed[0] == pytest.approx(0) and exposed == sorted(exposed) and exposed[-1] > 0


def test_the_stated_condition_is_exactly_when_nothing_is_exposed():
    values = (0.25, 0.5, 1.0, 1.5, 2.0)
    for attn, mlp, dispatch, combine in itertools.product(values, repeat=4):
        costs = OverlapCosts(attn, mlp, dispatch, combine, pp=0.25)
        exposed = exposed_communication(overlap_pair(costs, n_layers=3))
        assert (exposed < 1e-9) == communication_hidden(costs), costs


def test_balanced_layers_expose_what_communication_exceeds_computation():
    for c in (1.5, 2.0, 3.0):  # attention = MLP = 1: computation 6 per layer step, communication 4c + pp
        spans = overlap_pair(OverlapCosts(1, 1, c, c, pp=0.2), n_layers=5)
        assert exposed_communication(spans) == pytest.approx(5 * (4 * c + 0.2 - 6))


def test_without_overlap_the_pair_takes_the_sum_of_its_parts():
    costs = OverlapCosts(attn=1, mlp=1.5, dispatch=0.8, combine=0.7, pp=0.2)
    spans = overlap_pair(costs, n_layers=3, overlap=False)
    per_layer = 3 * costs.attn + 3 * costs.mlp + 2 * costs.dispatch + 2 * costs.combine + costs.pp
    assert max(s.end for s in spans) == pytest.approx(3 * per_layer)


# ---------------------------------------------------------------------------------------- real runs
def test_calc_diff():
    x = torch.randn(100, dtype=torch.float64)
    assert calc_diff(x, x) == 0.0 and calc_diff(x, -x) == pytest.approx(2.0)
    assert calc_diff(x, x * (1 + 1e-6)) == pytest.approx(0.5e-12, rel=0.01)  # about half the squared error


@pytest.mark.parametrize("method,stages", [("ZB1P", 1), ("DualPipeV", 1), ("1F1B", 1)])
def test_one_rank_runs_the_split_backward_exactly(method, stages):
    """A one-rank schedule needs no messages: its step (with W deferred for ZB1P and DualPipeV) matches the
    single process's."""
    schedule = build(method, stages, 4)
    workload = Workload(n_stages=schedule.n_stages, n_micro_batches=4, layers_per_stage=2)
    result = RankRunner(schedule, 0, workload, workload.build_stages(), workload.data()).run()
    reference = reference_step(workload)
    losses = torch.stack([result["losses"][mb] for mb in range(4)])
    assert torch.equal(losses, reference.losses)
    for (_, stage), grads in result["grads"].items():
        for name, g in grads.items():
            assert calc_diff(g, reference.grads[f"{stage}.{name}"]) < 1e-13


@pytest.fixture(scope="module")
def real_runs():
    """1F1B, ZB1P and DualPipe on 4 processes and DualPipeV on 2 of them, one spawned group, gloo."""
    workload = Workload(n_stages=4, n_micro_batches=8)
    schedules = [build("1F1B", 4, 8), build("ZB1P", 4, 8), build("DualPipe", 4, 8), build("DualPipeV", 2, 8)]
    results = run_spawned(schedules, workload, timeout=REAL_RUN_TIMEOUT_S)
    return schedules, results, reference_step(workload)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(4), ids=["1F1B", "ZB1P", "DualPipe", "DualPipeV"])
def test_real_run_reproduces_the_single_process_step(real_runs, index):
    schedules, results, reference = real_runs
    agreement = compare(results[index], reference)
    assert agreement.method == schedules[index].method
    assert agreement.losses_equal  # bitwise
    assert agreement.n_params == len(reference.grads)
    assert agreement.max_grad_diff < 1e-13


@pytest.mark.slow
def test_a_deadlocking_schedule_is_refused_before_any_process_starts():
    schedule = build("1F1B", 2, 4)
    first = list(schedule.ranks[0])  # F0 F1 B0 F2 B1 F3 B2 B3: B0 before F1 waits on rank 1's F1
    first[1], first[2] = first[2], first[1]
    second = list(schedule.ranks[1])  # F0 B0 F1 ...: rank 1 now wants F1 before B0
    second[1], second[2] = second[2], second[1]
    with pytest.raises(Deadlock):
        run_spawned([schedule.with_ranks([first, second])], Workload(n_stages=2, n_micro_batches=4))


@pytest.mark.slow
def test_processes_that_do_not_finish_in_time_are_stopped():
    with pytest.raises(TimeoutError, match="did not finish within 0.5 s"):
        run_spawned([build("1F1B", 2, 4)], Workload(n_stages=2, n_micro_batches=4), timeout=0.5)


@pytest.mark.slow
def test_torchrun_runs_dualpipev_on_two_processes():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "dsv3_lite.pipeline", "--methods", "DualPipeV", "--stages", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=REAL_RUN_TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("DualPipeV"))
    ranks, losses_equal, _, max_calc_diff, _ = row.split()[1:]
    assert (ranks, losses_equal) == ("2", "True") and float(max_calc_diff) < 1e-13


def test_main_refuses_to_run_outside_torchrun(monkeypatch, capsys):
    from dsv3_lite.pipeline import main

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit):
        main([])
    assert "torchrun" in capsys.readouterr().err
