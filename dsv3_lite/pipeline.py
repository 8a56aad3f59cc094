"""Pipeline parallelism: 1F1B, ZB1P, DualPipe and DualPipeV, as schedules, on a
simulated timeline, and run for real by several processes (report 3.2.1,
Figure 5, Table 2).

A model cut into consecutive stages runs on PP ranks; every micro-batch goes
forward through the stages and backward through them in reverse. A schedule is
each rank's ordered list of work:

    Op(kind, micro_batch, stage, direction)
        kind F   forward chunk
             B   full backward chunk (gradients of the input and the weights)
             BI  backward for the input only: what the previous stage waits on
             W   backward for the weights, deferred to fill a bubble
    Pair(forward, backward)   "F&B": a forward and a backward chunk run together, so
                              that each one's communication hides behind the other's
                              computation (report Figure 4)

DualPipe puts stages `rank` and `PP-1-rank` on every rank and feeds micro-batches
from both ends (direction 0 enters at rank 0, direction 1 at rank PP-1); DualPipeV
folds one pipeline of 2V stages into a V onto V ranks. `simulate` plays a schedule
with per-chunk costs, a point-to-point latency and an all-to-all time that
chunks run alone wait for and F&B pairs hide; `run_spawned` (or `torchrun -m
dsv3_lite.pipeline`) executes it with torch.distributed on a small stack of the
package's blocks and returns what a single process would have computed.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import os
import pathlib
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dsv3_lite.block import Block
from dsv3_lite.config import ModelArgs, check_int
from dsv3_lite.fp8 import calc_diff

KINDS = ("F", "B", "BI", "W")
METHODS = ("1F1B", "ZB1P", "DualPipe", "DualPipeV")


# --------------------------------------------------------------------- operations
class Op(NamedTuple):
    """One chunk of work: `kind` (F, B, BI or W) of micro-batch `micro_batch` at
    pipeline stage `stage`, in `direction` 0 or 1 (DualPipe's two ends)."""

    kind: str
    micro_batch: int
    stage: int
    direction: int = 0

    @property
    def chunk(self) -> tuple[int, int, int]:
        """(micro_batch, stage, direction): what F, B/BI and W of one chunk share."""
        return self.micro_batch, self.stage, self.direction

    def __str__(self) -> str:
        way = ", reverse" if self.direction else ""
        return f"{self.kind}{self.micro_batch} (stage {self.stage}{way})"


class Pair(NamedTuple):
    """A forward chunk and a backward chunk run as one overlapped unit ("F&B")."""

    forward: Op
    backward: Op

    @property
    def kind(self) -> str:
        return "F&B"

    def __str__(self) -> str:
        return f"{self.forward} & {self.backward}"


Slot = Op | Pair


def ops_of(slot: Slot) -> tuple[Op, ...]:
    """The chunks a slot runs: one, or a pair's forward and backward."""
    return (slot.forward, slot.backward) if isinstance(slot, Pair) else (slot,)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Each rank's ordered slots for one training step.

    `placement[(direction, stage)]` is the rank that runs that stage for the
    micro-batches of that direction; `micro_batches[d]` are direction d's ids.
    """

    method: str
    n_ranks: int
    n_stages: int
    placement: dict[tuple[int, int], int]
    micro_batches: tuple[tuple[int, ...], ...]
    ranks: tuple[tuple[Slot, ...], ...]

    @property
    def n_micro_batches(self) -> int:
        return sum(len(m) for m in self.micro_batches)

    def stages_on(self, rank: int) -> list[tuple[int, int]]:
        """The (direction, stage) pairs whose parameters `rank` holds."""
        return sorted(key for key, r in self.placement.items() if r == rank)

    def with_ranks(self, ranks: Sequence[Sequence[Slot]]) -> Schedule:
        """The same placement with other slot lists (for experiments and tests)."""
        return dataclasses.replace(self, ranks=tuple(tuple(r) for r in ranks))


def check_schedule(schedule: Schedule) -> None:
    """Raise ValueError unless every chunk of every micro-batch runs exactly once
    per stage, on the rank that holds the stage, in the order F, then B (or BI,
    then W). Cross-rank order is `simulate`'s to check (it reports deadlocks)."""
    seen: dict[tuple[str, tuple[int, int, int]], tuple[int, int]] = {}
    for rank, slots in enumerate(schedule.ranks):
        for position, slot in enumerate(slots):
            for op in ops_of(slot):
                if op.kind not in KINDS:
                    raise ValueError(f"rank {rank}, slot {position}: unknown kind "
                                     f"{op.kind!r} (one of {', '.join(KINDS)})")
                where = schedule.placement.get((op.direction, op.stage))
                if where != rank:
                    raise ValueError(f"rank {rank}, slot {position}: {op} belongs "
                                     f"on rank {where}")
                key = ("B" if op.kind == "BI" else op.kind, op.chunk)
                if key in seen:
                    raise ValueError(f"{op} appears twice (rank {rank}, slots "
                                     f"{seen[key][1]} and {position})")
                seen[key] = rank, position
    for d, ids in enumerate(schedule.micro_batches):
        for mb in ids:
            for stage in range(schedule.n_stages):
                chunk = mb, stage, d
                where = [seen.get((k, chunk)) for k in ("F", "B", "W")]
                split = (where[1] is not None and
                         _op_at(schedule, *where[1], chunk).kind == "BI")
                needed = ["F", "B"] + (["W"] if split else [])
                for kind, at in zip(("F", "B", "W"), where):
                    if kind in needed and at is None:
                        name = "BI" if split and kind == "B" else kind
                        raise ValueError(f"{Op(name, *chunk)} is missing")
                    if kind not in needed and at is not None:
                        raise ValueError(f"{Op(kind, *chunk)} without a BI: a full "
                                         "backward B computes its weight "
                                         "gradients itself")
                order = [at for at in where if at is not None]
                for first, then in zip(order, order[1:]):
                    if not first[1] < then[1]:
                        raise ValueError(
                            f"rank {first[0]} runs {_op_at(schedule, *then, chunk)}"
                            f" at slot {then[1]}, not after "
                            f"{_op_at(schedule, *first, chunk)} at slot {first[1]}")
    extra = {op.micro_batch for slots in schedule.ranks for s in slots
             for op in ops_of(s)} - {m for ids in schedule.micro_batches for m in ids}
    if extra:
        raise ValueError(f"micro-batches {sorted(extra)} are not in the schedule's "
                         "micro_batches")


def _op_at(schedule: Schedule, rank: int, position: int,
           chunk: tuple[int, int, int]) -> Op:
    return next(op for op in ops_of(schedule.ranks[rank][position])
                if op.chunk == chunk)


# ----------------------------------------------------------------------- builders
def _check_sizes(method: str, n_ranks: int, n_micro_batches: int) -> None:
    check_int("n_ranks", n_ranks, 1)
    check_int("n_micro_batches", n_micro_batches, 1)
    if method == "DualPipe":
        if n_ranks % 2:
            raise ValueError(f"DualPipe needs an even number of ranks, got PP = "
                             f"{n_ranks}: rank r holds stages r and PP-1-r")
        if n_micro_batches % 2:
            raise ValueError("DualPipe needs an even number of micro-batches, half "
                             f"from each end, got {n_micro_batches}")
        if n_micro_batches < 2 * n_ranks:
            raise ValueError(f"DualPipe needs at least 2 * PP = {2 * n_ranks} "
                             f"micro-batches, got {n_micro_batches}")
    if method == "DualPipeV" and n_micro_batches < 2 * n_ranks:
        raise ValueError(f"DualPipeV needs at least as many micro-batches as stages "
                         f"(2 * ranks = {2 * n_ranks}), got {n_micro_batches}")


def one_f_one_b(n_ranks: int, n_micro_batches: int) -> Schedule:
    """1F1B in its synchronous form, PipeDream-Flush (Narayanan et al. 2021,
    "Memory-Efficient Pipeline-Parallel DNN Training"): rank r runs PP-1-r
    warm-up forwards, then alternates one forward and one full backward, then
    drains the remaining backwards; the weights update once per step."""
    _check_sizes("1F1B", n_ranks, n_micro_batches)
    m, ranks = n_micro_batches, []
    for r in range(n_ranks):
        warmup = min(n_ranks - 1 - r, m)
        slots = [Op("F", j, r) for j in range(warmup)]
        for k in range(m - warmup):
            slots += [Op("F", warmup + k, r), Op("B", k, r)]
        slots += [Op("B", k, r) for k in range(m - warmup, m)]
        ranks.append(slots)
    return _schedule("1F1B", n_ranks, n_ranks, {(0, s): s for s in range(n_ranks)},
                     (tuple(range(m)),), ranks)


def zb1p(n_ranks: int, n_micro_batches: int) -> Schedule:
    """ZB1P (zero bubble, Qi et al. 2023, "ZB-H1"): 1F1B with every backward split
    into BI and W. Rank r keeps up to r weight chunks waiting, so the input
    gradients race back through the pipeline and the W chunks fill the bubbles;
    no rank holds more activations than 1F1B's rank 0 (PP)."""
    _check_sizes("ZB1P", n_ranks, n_micro_batches)
    m, ranks = n_micro_batches, []
    for r in range(n_ranks):
        warmup = min(n_ranks - 1 - r, m)
        slots = [Op("F", j, r) for j in range(warmup)]
        waiting: collections.deque[int] = collections.deque()
        for k in range(m):
            if warmup + k < m:
                slots.append(Op("F", warmup + k, r))
            slots.append(Op("BI", k, r))
            waiting.append(k)
            if len(waiting) > r:
                slots.append(Op("W", waiting.popleft(), r))
        slots += [Op("W", k, r) for k in waiting]
        ranks.append(slots)
    return _schedule("ZB1P", n_ranks, n_ranks, {(0, s): s for s in range(n_ranks)},
                     (tuple(range(m)),), ranks)


def _dualpipe_program(h: int, n: int, chunks: int, middle: bool) -> list[tuple]:
    """One rank's DualPipe program in the eight steps of DeepSeek's official
    `DualPipe.step()` (github.com/deepseek-ai/DualPipe; the report draws the
    schedule in Figure 5 but lists no steps), as items (kind, phase) or
    ("F&B", forward phase, backward phase) or ("W",).

    Phase 0 is the stage at distance h from its input end (the rank's "near"
    stage), phase 1 the stage at distance 2n-1-h; n = PP/2, h = min(rank,
    PP-1-rank), `chunks` micro-batches per direction.
    """
    far = n - h - 1
    prog: list[tuple] = [("F", 0)] * (2 * far)                  # 1 forwards only
    prog += [("F", 0), ("F", 1)] * (h + 1)                     # 2 forward pairs
    prog += [("BI", 1), ("W",), ("F", 1)] * far                # 3 zero-bubble BI W F
    for i in range(chunks - 2 * n + h + 1):                    # 4 main F&B loop
        if i == 0 and middle:  # the two chunks meet here: run them back to back
            prog += [("F", 0), ("B", 1)]
        else:
            prog.append(("F&B", 0, 1))
        prog.append(("F&B", 1, 0))
    prog += [("B", 1), ("F&B", 1, 0)] * far                    # 5 B, then F&B
    half = (h + 1) // 2
    for i in range(h + 1):                                     # 6 backward pairs,
        split_1 = i > half or (i == half and h % 2 == 1)       # the later half
        prog += [("BI" if split_1 else "B", 1),                # with W deferred
                 ("BI" if i >= half else "B", 0)]
    prog += [("W",), ("BI", 0)] * far                          # 7 W with BI
    prog += [("W",)] * (h + 1)                                 # 8 W only
    return prog


def _resolve(prog: list[tuple], where: dict[int, tuple[int, int]],
             ids: Sequence[Sequence[int]]) -> list[Slot]:
    """Give each item of a DualPipe program its micro-batch (forwards and
    backwards in order per phase; each W takes the oldest waiting BI)."""
    next_f, next_b = [0, 0], [0, 0]
    waiting: collections.deque[Op] = collections.deque()

    def op(kind: str, phase: int) -> Op:
        d, stage = where[phase]
        counter = next_f if kind == "F" else next_b
        made = Op(kind, ids[d][counter[phase]], stage, d)
        counter[phase] += 1
        if kind == "BI":
            waiting.append(made)
        return made

    slots: list[Slot] = []
    for item in prog:
        if item[0] == "W":
            slots.append(waiting.popleft()._replace(kind="W"))
        elif item[0] == "F&B":
            slots.append(Pair(op("F", item[1]), op("B", item[2])))
        else:
            slots.append(op(*item))
    return slots


def dualpipe(n_ranks: int, n_micro_batches: int) -> Schedule:
    """DualPipe: PP stages, each held twice (rank r runs stage r for direction 0
    and stage PP-1-r for direction 1); half the micro-batches enter at rank 0,
    half at rank PP-1. Needs PP even, micro-batches even and >= 2 PP. The two
    copies of stage r, on ranks r and PP-1-r, sum their gradients (an
    all-reduce between the two ranks) before every optimizer step."""
    _check_sizes("DualPipe", n_ranks, n_micro_batches)
    pp, n, chunks = n_ranks, n_ranks // 2, n_micro_batches // 2
    ids = (tuple(range(chunks)), tuple(range(chunks, 2 * chunks)))
    ranks = []
    for r in range(pp):
        h, second = min(r, pp - 1 - r), r >= n
        # phase 0: the direction in which this rank is at distance h from the
        # input end; phase 1: the other one
        where = {p: (p ^ second, r if p ^ second == 0 else pp - 1 - r)
                 for p in (0, 1)}
        ranks.append(_resolve(_dualpipe_program(h, n, chunks, h == n - 1),
                              where, ids))
    placement = {(0, s): s for s in range(pp)}
    placement.update({(1, s): pp - 1 - s for s in range(pp)})
    return _schedule("DualPipe", pp, pp, placement, ids, ranks)


def dualpipev(n_ranks: int, n_micro_batches: int) -> Schedule:
    """DualPipeV: one pipeline of 2V stages folded into a V on V ranks (rank r
    holds stages r and 2V-1-r), run with DualPipe's per-rank program; every
    micro-batch enters and leaves at rank 0. Needs m >= 2V micro-batches. Rank
    r runs what rank r of dualpipe(2V, 2m) runs, op for op (micro-batch j at a
    stage s >= V being that schedule's m + j), and holds each stage once."""
    _check_sizes("DualPipeV", n_ranks, n_micro_batches)
    v, m = n_ranks, n_micro_batches
    ids = (tuple(range(m)),)
    ranks = [_resolve(_dualpipe_program(r, v, m, r == v - 1),
                      {0: (0, r), 1: (0, 2 * v - 1 - r)}, ids) for r in range(v)]
    placement = {(0, s): min(s, 2 * v - 1 - s) for s in range(2 * v)}
    return _schedule("DualPipeV", v, 2 * v, placement, ids, ranks)


BUILDERS = {"1F1B": one_f_one_b, "ZB1P": zb1p, "DualPipe": dualpipe,
            "DualPipeV": dualpipev}


def build(method: str, n_ranks: int, n_micro_batches: int) -> Schedule:
    """The schedule of `method` (one of METHODS) for n_ranks ranks and
    n_micro_batches micro-batches in total."""
    if method not in BUILDERS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got "
                         f"{method!r}")
    return BUILDERS[method](n_ranks, n_micro_batches)


def _schedule(method, n_ranks, n_stages, placement, ids, ranks) -> Schedule:
    schedule = Schedule(method, n_ranks, n_stages, placement, ids,
                        tuple(tuple(r) for r in ranks))
    check_schedule(schedule)
    return schedule


# ---------------------------------------------------------------------- simulator
@dataclasses.dataclass(frozen=True)
class Costs:
    """Time of each kind of chunk, in any unit: forward f, full backward b, its
    weight part w (so BI costs b - w), an overlapped F&B pair fb (default f + b:
    overlap hides communication, not computation), the latency p2p of a
    point-to-point send between two ranks, and the all-to-all time all_to_all
    (expert-parallel dispatch and combine) of one forward or backward chunk.

    A chunk run alone waits for its all-to-all: F, B and BI each cost all_to_all
    more (W sends nothing). An F&B pair hides both chunks' all-to-alls behind
    each other's computation (report Figure 4), so fb does not include it; with
    all_to_all = 0 (the default) no chunk communicates."""

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float | None = None
    p2p: float = 0.0
    all_to_all: float = 0.0

    def __post_init__(self) -> None:
        for name in ("f", "b", "w", "p2p", "all_to_all"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 0")
        if self.w > self.b:
            raise ValueError(f"w ({self.w}) must be <= b ({self.b}): W is part of "
                             "the full backward")
        if self.fb is not None and not self.fb >= 0:
            raise ValueError(f"fb ({self.fb}) must be >= 0")

    @classmethod
    def from_overlap(cls, parts: OverlapCosts, n_layers: int = 1,
                     p2p: float = 0.0) -> Costs:
        """The chunk costs of n_layers layers with the per-layer parts of
        `parts`: a forward computes attn + mlp per layer, a backward twice that
        (its W half), each chunk's all-to-all is dispatch + combine per layer,
        and an F&B pair lasts what `overlap_pair` lays out (its computation plus
        the communication it leaves exposed)."""
        spans = overlap_pair(parts, n_layers)
        f = n_layers * (parts.attn + parts.mlp)
        return cls(f=f, b=2 * f, w=f, fb=3 * f + exposed_communication(spans),
                   p2p=p2p, all_to_all=n_layers * (parts.dispatch + parts.combine))

    @property
    def f_and_b(self) -> float:
        return self.f + self.b if self.fb is None else self.fb

    def of(self, slot: Slot) -> float:
        """The duration of one slot."""
        if isinstance(slot, Pair):
            return self.f_and_b - (self.w if slot.backward.kind == "BI" else 0.0)
        return {"F": self.f + self.all_to_all, "B": self.b + self.all_to_all,
                "BI": self.b - self.w + self.all_to_all, "W": self.w}[slot.kind]


class Interval(NamedTuple):
    rank: int
    start: float
    end: float
    slot: Slot


@dataclasses.dataclass(frozen=True)
class Timeline:
    """What `simulate` found: every slot's interval, the step's length, and per
    rank its bubble (idle time within the step), its peak of activations held
    (chunks forwarded whose backward, or W, has not finished) and the number of
    stage copies whose parameters it holds."""

    schedule: Schedule
    costs: Costs
    intervals: tuple[Interval, ...]
    makespan: float
    bubble: tuple[float, ...]
    peak_activations: tuple[int, ...]
    parameter_copies: tuple[int, ...]


class Deadlock(RuntimeError):
    """No rank can run its next slot. `waits` lists, per blocked rank, the slot
    it is stuck at and the chunk it waits for, with the rank that owes it."""

    def __init__(self, message: str, waits: list[tuple[int, Slot, Op, int]]):
        super().__init__(message)
        self.waits = waits


def _needs(op: Op, n_stages: int) -> list[Op]:
    """The chunks that must finish before `op` can start (BI stands for B or BI:
    the input gradient)."""
    mb, s, d = op.chunk
    if op.kind == "F":
        return [Op("F", mb, s - 1, d)] if s > 0 else []
    if op.kind == "W":
        return [Op("BI", mb, s, d)]
    return [Op("F", mb, s, d)] + ([Op("BI", mb, s + 1, d)] if s + 1 < n_stages
                                  else [])


def _done_key(op: Op) -> tuple[str, tuple[int, int, int]]:
    return ("BI" if op.kind in ("B", "BI") else op.kind), op.chunk


def simulate(schedule: Schedule, costs: Costs = Costs()) -> Timeline:
    """Play `schedule`: each rank runs its slots in order, one at a time; a slot
    starts when its rank is free and every chunk it depends on has finished
    (plus `costs.p2p` when that chunk ran on another rank). Raises Deadlock,
    naming the waiting ranks and chunks, if the ranks wait on each other."""
    check_schedule(schedule)
    n = schedule.n_ranks
    done: dict[tuple[str, tuple[int, int, int]], tuple[float, int]] = {}
    position, free = [0] * n, [0.0] * n
    intervals: list[Interval] = []
    progress = True
    while progress:
        progress = False
        for rank in range(n):
            while position[rank] < len(schedule.ranks[rank]):
                slot = schedule.ranks[rank][position[rank]]
                needs = [_done_key(x) for op in ops_of(slot)
                         for x in _needs(op, schedule.n_stages)]
                if any(k not in done for k in needs):
                    break
                start = max([free[rank]] + [
                    done[k][0] + (costs.p2p if done[k][1] != rank else 0.0)
                    for k in needs])
                end = start + costs.of(slot)
                for op in ops_of(slot):
                    done[_done_key(op)] = end, rank
                intervals.append(Interval(rank, start, end, slot))
                free[rank] = end
                position[rank] += 1
                progress = True
    if any(position[r] < len(schedule.ranks[r]) for r in range(n)):
        raise _deadlock(schedule, position, done)
    makespan = max(free)
    busy = [0.0] * n
    for iv in intervals:
        busy[iv.rank] += iv.end - iv.start
    return Timeline(schedule, costs, tuple(intervals), makespan,
                    tuple(makespan - b for b in busy),
                    tuple(peak_activations(s) for s in schedule.ranks),
                    tuple(len(schedule.stages_on(r)) for r in range(n)))


def _deadlock(schedule: Schedule, position: list[int], done: dict) -> Deadlock:
    owner = {_done_key(op): (rank, i) for rank, slots in enumerate(schedule.ranks)
             for i, slot in enumerate(slots) for op in ops_of(slot)}
    waits, lines = [], []
    for rank, slots in enumerate(schedule.ranks):
        if position[rank] == len(slots):
            continue
        slot = slots[position[rank]]
        for op in ops_of(slot):
            for need in _needs(op, schedule.n_stages):
                key = _done_key(need)
                if key in done:
                    continue
                holder, at = owner[key]
                named = _op_at(schedule, holder, at, need.chunk)
                waits.append((rank, slot, named, holder))
                lines.append(f"rank {rank} waits at slot {position[rank]}, {slot}, "
                             f"for {named}: slot {at} of rank {holder}")
    cycle = _wait_cycle({w[0]: w[3] for w in waits})
    if len(cycle) == 2:
        head = f"deadlock: rank {cycle[0]} waits on its own later slot"
    elif cycle:
        head = ("deadlock: ranks " + " -> ".join(map(str, cycle))
                + " wait on each other")
    else:
        head = "deadlock"
    return Deadlock(head + "\n" + "\n".join(lines), waits)


def _wait_cycle(waits_for: dict[int, int]) -> list[int]:
    for start in waits_for:
        path, rank = [], start
        while rank in waits_for and rank not in path:
            path.append(rank)
            rank = waits_for[rank]
        if rank in path:
            return path[path.index(rank):] + [rank]
    return []


def peak_activations(slots: Sequence[Slot]) -> int:
    """Most chunks a rank holds activations for at once, running `slots` in
    order: a forward adds one when it starts; a full backward, or a W, releases
    it when it ends (a BI keeps what the W still needs)."""
    held = peak = 0
    for slot in slots:
        ops = ops_of(slot)
        held += sum(op.kind == "F" for op in ops)
        peak = max(peak, held)
        held -= sum(op.kind in ("B", "W") for op in ops)
    return peak


def table2_bubble(method: str, n_stages: int, costs: Costs) -> float:
    """The report's Table 2 bubble for PP = n_stages pipeline stages:
    1F1B (PP-1)(F+B), ZB1P (PP-1)(F+B-2W), DualPipe and DualPipeV
    (PP/2-1)(F&B+B-3W). DualPipeV runs its PP stages on PP/2 ranks. F and B are
    the times of a chunk run alone, its exposed all-to-all included."""
    pp, c = n_stages, costs
    f, b = c.of(Op("F", 0, 0)), c.of(Op("B", 0, 0))
    formulas = {"1F1B": (pp - 1) * (f + b),
                "ZB1P": (pp - 1) * (f + b - 2 * c.w),
                "DualPipe": (pp / 2 - 1) * (c.f_and_b + b - 3 * c.w)}
    formulas["DualPipeV"] = formulas["DualPipe"]
    if method not in formulas:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got "
                         f"{method!r}")
    return formulas[method]


# ------------------------------------------- overlap inside a forward-backward pair
class OverlapCosts(NamedTuple):
    """Per-layer times of one forward chunk's parts (report Figure 4): attention
    and MLP (experts) computation, the all-to-all dispatch and combine, and the
    pipeline send/receive. A backward part costs twice its forward (half for the
    input, half for the weights); a backward all-to-all moves as much as its
    forward one."""

    attn: float = 1.0
    mlp: float = 1.0
    dispatch: float = 0.8
    combine: float = 0.8
    pp: float = 0.2


class Span(NamedTuple):
    stream: str     # "compute" or "communication"
    name: str       # e.g. "MLP (B)", "DISPATCH (F)"
    layer: int
    start: float
    end: float


# One layer-step of the pair, in the order each stream runs it (report Figure 4):
# the backward chunk's MLP runs while the forward chunk's tokens are dispatched,
# the forward MLP while the backward gradients are dispatched, and so on. Each
# entry: name, stream, cost field, what it waits for (names ending in "-1": the
# previous step's part).
_PAIR_STEP = (
    ("MLP (B)", "compute", "mlp", ("COMBINE (B)-1",)),
    ("MLP (W)", "compute", "mlp", ("MLP (B)",)),
    ("MLP (F)", "compute", "mlp", ("DISPATCH (F)",)),
    ("ATTN (B)", "compute", "attn", ("DISPATCH (B)",)),
    ("ATTN (W)", "compute", "attn", ("ATTN (B)",)),
    ("ATTN (F)", "compute", "attn", ("COMBINE (F)",)),
    ("DISPATCH (F)", "communication", "dispatch", ("ATTN (F)-1",)),
    ("DISPATCH (B)", "communication", "dispatch", ("MLP (B)",)),
    ("COMBINE (F)", "communication", "combine", ("MLP (F)",)),
    ("PP", "communication", "pp", ("COMBINE (F)", "ATTN (B)")),
    ("COMBINE (B)", "communication", "combine", ("ATTN (B)",)),
)


def overlap_pair(costs: OverlapCosts, n_layers: int = 4,
                 overlap: bool = True) -> list[Span]:
    """Lay out n_layers steps of an overlapped forward-backward pair on two
    streams, each running its parts in the report's order and each part
    starting once what it waits for has finished. With overlap=False every part
    also waits for the part before it: the time of one stream doing it all."""
    check_int("n_layers", n_layers, 1)
    for name, value in costs._asdict().items():
        if not value >= 0:
            raise ValueError(f"{name} ({value}) must be >= 0")
    end: dict[tuple[str, int], float] = {}
    free = {"compute": 0.0, "communication": 0.0}
    spans, last = [], 0.0
    for layer in range(n_layers):
        queues = {stream: [p for p in _PAIR_STEP if p[1] == stream]
                  for stream in free}
        while any(queues.values()):
            moved = False
            for stream, queue in queues.items():
                while queue:
                    name, _, field, after = queue[0]
                    keys = [(a[:-2], layer - 1) if a.endswith("-1") else (a, layer)
                            for a in after]
                    keys = [k for k in keys if k[1] >= 0]
                    if any(k not in end for k in keys):
                        break
                    start = max([free[stream]] + [end[k] for k in keys]
                                + ([] if overlap else [last]))
                    stop = start + getattr(costs, field)
                    end[name, layer], free[stream], last = stop, stop, stop
                    spans.append(Span(stream, name, layer, start, stop))
                    queue.pop(0)
                    moved = True
            if not moved:
                raise RuntimeError("overlap_pair: the parts wait on each other")
    return spans


def communication_hidden(costs: OverlapCosts) -> bool:
    """Whether `overlap_pair`'s layout hides every transfer: in a step whose
    computation runs back to back (MLP B, W, F, then attention B, W, F), each
    transfer must end before the part that needs it starts. The dispatch of the
    forward tokens and then of the backward gradients must end by the start of
    attention B (d <= 1.5 mlp); the forward combine by attention F (c <= 2 attn);
    the pipeline send and the backward combine by the next step (max(c, attn) +
    pp + c <= 3 attn)."""
    a, m, d, c, pp = costs
    return d <= 1.5 * m and c <= 2 * a and max(c, a) + pp + c <= 3 * a


def exposed_communication(spans: Sequence[Span]) -> float:
    """Time the compute stream sits idle inside the pair: the communication
    that the other chunk's computation did not hide."""
    length = max(s.end for s in spans)
    return length - sum(s.end - s.start for s in spans if s.stream == "compute")


# ----------------------------------------------------------------------- real runs
class Stage(nn.Module):
    """Consecutive Transformer blocks as one pipeline stage: (B, S, dim) ->
    (B, S, dim); the blocks' MoE routing, if any, is dropped."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x, _ = block(x)
        return x


@dataclasses.dataclass(frozen=True)
class Workload:
    """The model and data of a real run, rebuilt identically from `seed` in every
    process: n_stages stages of layers_per_stage blocks of a tiny DeepSeek-V3
    (`ModelArgs.tiny`: MLA and a dense SwiGLU FFN, in float64; the experts' grouped
    multiply has no float64 kernel on the CPU) and n_micro_batches random micro-
    batches (inputs and regression targets) with a mean-squared-error loss."""

    n_stages: int = 4
    layers_per_stage: int = 1
    n_micro_batches: int = 8
    micro_batch_size: int = 2
    seq_len: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_stages", "layers_per_stage", "n_micro_batches",
                     "micro_batch_size", "seq_len"):
            check_int(name, getattr(self, name), 1)

    def model_args(self) -> ModelArgs:
        n = self.n_stages * self.layers_per_stage
        return ModelArgs.tiny(n_layers=n, n_dense_layers=n, mtp_depth=0)

    def build_stages(self) -> nn.ModuleList:
        """All stages, float64, with the blocks' own initialisation drawn from
        `seed` (the same weights in every process)."""
        args = self.model_args()
        torch.manual_seed(self.seed)
        per = self.layers_per_stage
        return nn.ModuleList(
            Stage([Block(args, moe=False) for _ in range(per)])
            for _ in range(self.n_stages)).to(torch.float64)

    def data(self) -> list[tuple[Tensor, Tensor]]:
        """(input, target) of every micro-batch, (micro_batch_size, seq_len, dim)."""
        g = torch.Generator().manual_seed(self.seed + 1)
        shape = (self.micro_batch_size, self.seq_len, self.model_args().dim)
        return [(torch.randn(shape, generator=g, dtype=torch.float64),
                 torch.randn(shape, generator=g, dtype=torch.float64))
                for _ in range(self.n_micro_batches)]

    @staticmethod
    def loss(output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output, target)


class StepResult(NamedTuple):
    """A training step's per-micro-batch losses (n_micro_batches,) and the
    gradient of every parameter, keyed "stage.name" as in
    `Workload.build_stages().named_parameters()` (DualPipe's two copies of a
    stage summed)."""

    method: str
    losses: Tensor
    grads: dict[str, Tensor]


def reference_step(workload: Workload) -> StepResult:
    """One process, no pipeline: each micro-batch forward through every stage,
    its loss, backward; gradients accumulate over micro-batches."""
    with _one_thread():
        stages = workload.build_stages()
        losses = []
        for x, target in workload.data():
            for stage in stages:
                x = stage(x)
            loss = workload.loss(x, target)
            loss.backward()
            losses.append(loss.detach())
    return StepResult("reference", torch.stack(losses),
                      {name: p.grad for name, p in stages.named_parameters()})


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread inside the block (so that every process, and the
    reference, computes each chunk the same way), the old setting after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RankRunner:
    """Runs one rank's slots of a schedule: receives activations and gradients
    from the ranks of the neighbouring stages, computes, sends.

    A BI computes the gradient of the stage input and of every parameter-holding
    module's output, and keeps those; the W that comes later turns each module's
    output gradient into its parameters' gradients, so the weight part of the
    backward runs where the schedule puts it."""

    def __init__(self, schedule: Schedule, rank: int, workload: Workload,
                 stages: nn.ModuleList, data: list[tuple[Tensor, Tensor]]):
        self.schedule, self.rank, self.workload = schedule, rank, workload
        self.data = data
        held = schedule.stages_on(rank)
        self.stages = {key: stages[key[1]] for key in held}
        self.split = {op.chunk for slot in schedule.ranks[rank]
                      for op in ops_of(slot) if op.kind == "BI"}
        self.saved: dict[tuple[int, int, int], tuple] = {}
        self.weight_work: dict[tuple[int, int, int], list] = {}
        self.local: dict[tuple, Tensor] = {}
        self.sends: list = []
        self.losses: dict[int, Tensor] = {}

    # messages: tag = what (activation 0 / gradient 1), chunk
    def _tag(self, what: int, mb: int, stage: int, d: int) -> int:
        s = self.schedule
        return ((what * 2 + d) * s.n_stages + stage) * s.n_micro_batches + mb

    def _send(self, tensor: Tensor, what: int, mb: int, stage: int, d: int) -> None:
        dst = self.schedule.placement[(d, stage)]
        tensor = tensor.detach().contiguous()
        if dst == self.rank:
            self.local[what, mb, stage, d] = tensor
        else:
            tag = self._tag(what, mb, stage, d)
            self.sends.append((dist.isend(tensor, dst, tag=tag), tensor))

    def _receive(self, what: int, mb: int, stage: int, d: int, src: int) -> Tensor:
        if src == self.rank:
            return self.local.pop((what, mb, stage, d))
        shape = self.data[0][0].shape
        tensor = torch.empty(shape, dtype=torch.float64)
        dist.recv(tensor, src, tag=self._tag(what, mb, stage, d))
        return tensor

    def run(self) -> dict:
        for slot in self.schedule.ranks[self.rank]:
            for op in ops_of(slot):
                getattr(self, "_" + op.kind)(op)
        for work, _ in self.sends:
            work.wait()
        grads = {}
        for (d, s), stage in self.stages.items():
            grads[d, s] = {name: p.grad for name, p in stage.named_parameters()}
        return {"losses": self.losses, "grads": grads}

    def _F(self, op: Op) -> None:
        mb, s, d = op.chunk
        if s == 0:
            x = self.data[mb][0].clone()
        else:
            x = self._receive(0, mb, s, d, self.schedule.placement[(d, s - 1)])
        x.requires_grad_(True)
        captured: list[tuple[nn.Module, Tensor]] = []
        hooks = []
        if op.chunk in self.split:
            def keep(module, _inputs, output):
                outs = output if isinstance(output, (tuple, list)) else (output,)
                captured.extend((module, t) for t in outs
                                if isinstance(t, Tensor) and t.requires_grad)
            hooks = [m.register_forward_hook(keep)
                     for m in self.stages[d, s].modules()
                     if any(p.requires_grad for p in m.parameters(recurse=False))]
        try:
            y = self.stages[d, s](x)
        finally:
            for hook in hooks:
                hook.remove()
        if s == self.schedule.n_stages - 1:
            y = self.workload.loss(y, self.data[mb][1])
            self.losses[mb] = y.detach()
        else:
            self._send(y, 0, mb, s + 1, d)
        self.saved[op.chunk] = x, y, captured

    def _output_grad(self, op: Op) -> Tensor | None:
        mb, s, d = op.chunk
        if s == self.schedule.n_stages - 1:
            return None  # y is the loss
        return self._receive(1, mb, s, d, self.schedule.placement[(d, s + 1)])

    def _B(self, op: Op) -> None:
        x, y, _ = self.saved.pop(op.chunk)
        y.backward(self._output_grad(op))
        if op.stage > 0:
            self._send(x.grad, 1, op.micro_batch, op.stage - 1, op.direction)

    def _BI(self, op: Op) -> None:
        x, y, captured = self.saved.pop(op.chunk)
        g = self._output_grad(op)
        grads = torch.autograd.grad(y, [x] + [t for _, t in captured], g,
                                    retain_graph=True, allow_unused=True)
        if op.stage > 0:
            self._send(grads[0], 1, op.micro_batch, op.stage - 1, op.direction)
        self.weight_work[op.chunk] = list(zip(captured, grads[1:]))

    def _W(self, op: Op) -> None:
        for (module, output), grad in self.weight_work.pop(op.chunk):
            if grad is None:
                continue
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            for p, g in zip(params, torch.autograd.grad(
                    output, params, grad, retain_graph=True, allow_unused=True)):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g


def run_rank(schedules: Sequence[Schedule], workload: Workload) -> list | None:
    """Inside an initialised process group: run every schedule (ranks beyond a
    schedule's size sit it out) and gather the results on rank 0, which returns
    one StepResult per schedule (the others return None)."""
    rank = dist.get_rank()
    data = workload.data()
    mine = []
    with _one_thread():
        for schedule in schedules:
            _check_runnable(schedule, workload, dist.get_world_size())
            if rank < schedule.n_ranks:
                stages = workload.build_stages()
                mine.append(RankRunner(schedule, rank, workload, stages,
                                        data).run())
            else:
                mine.append(None)
            dist.barrier()
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return None
    return [_merge(schedule, [g[i] for g in gathered if g[i] is not None])
            for i, schedule in enumerate(schedules)]


def _check_runnable(schedule: Schedule, workload: Workload, world: int) -> None:
    if schedule.n_stages != workload.n_stages:
        raise ValueError(f"the {schedule.method} schedule has {schedule.n_stages} "
                         f"stages but the workload {workload.n_stages}")
    if schedule.n_micro_batches != workload.n_micro_batches:
        raise ValueError(f"the {schedule.method} schedule has "
                         f"{schedule.n_micro_batches} micro-batches but the "
                         f"workload {workload.n_micro_batches}")
    if schedule.n_ranks > world:
        raise ValueError(f"the {schedule.method} schedule needs "
                         f"{schedule.n_ranks} processes, the group has {world}")


def _merge(schedule: Schedule, per_rank: list[dict]) -> StepResult:
    losses: dict[int, Tensor] = {}
    grads: dict[str, Tensor] = {}
    for result in per_rank:
        losses.update(result["losses"])
        for (_, stage), named in sorted(result["grads"].items()):
            for name, g in named.items():
                key = f"{stage}.{name}"
                grads[key] = g.clone() if key not in grads else grads[key] + g
    ordered = [losses[mb] for mb in range(schedule.n_micro_batches)]
    return StepResult(schedule.method, torch.stack(ordered), grads)


class Agreement(NamedTuple):
    method: str
    losses_equal: bool        # every micro-batch's loss bitwise equal
    max_grad_diff: float      # largest calc_diff over the parameters
    max_rel_diff: float       # largest max|a - b| / max|b| over the parameters
    grads_equal: int          # parameters whose gradient is bitwise equal
    n_params: int             # parameters compared


def compare(result: StepResult, reference: StepResult) -> Agreement:
    """How closely a pipelined step reproduces the single-process one."""
    if set(result.grads) != set(reference.grads):
        raise ValueError("the two steps have gradients for different parameters")
    diffs, rel, equal = [], [], 0
    for name, ref in reference.grads.items():
        got = result.grads[name]
        diffs.append(calc_diff(got, ref))
        scale = ref.abs().max().item()
        rel.append((got - ref).abs().max().item() / scale if scale else 0.0)
        equal += torch.equal(got, ref)
    return Agreement(result.method, torch.equal(result.losses, reference.losses),
                     max(diffs), max(rel), equal, len(diffs))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, init_method: str, timeout_s: float,
             schedules: list[Schedule], workload: Workload, out: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        results = run_rank(schedules, workload)
        if rank == 0:  # plain tensors and strings: loaded with weights_only
            torch.save([tuple(r) for r in results], out)
    finally:
        dist.destroy_process_group()


def run_spawned(schedules: Sequence[Schedule], workload: Workload = Workload(),
                timeout: float = 120.0) -> list[StepResult]:
    """Run the schedules for real: one spawned process per rank (as many as the
    largest schedule has), gloo point-to-point messages on this machine, one
    schedule after the other. Returns one StepResult per schedule; raises
    TimeoutError (after stopping the processes) if they have not finished
    within `timeout` seconds, so a hang fails instead of blocking."""
    schedules = list(schedules)
    if not schedules:
        raise ValueError("schedules must not be empty")
    for schedule in schedules:
        _check_runnable(schedule, workload, schedule.n_ranks)
        simulate(schedule)  # a schedule that would deadlock fails here, named
    world = max(s.n_ranks for s in schedules)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(pathlib.Path(tmp) / "results.pt")
        context = torch.multiprocessing.start_processes(
            _spawned, nprocs=world, join=False, start_method="spawn",
            args=(world, f"tcp://127.0.0.1:{free_port()}", timeout, schedules,
                  workload, out))
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the {world} pipeline processes did not "
                                       f"finish within {timeout:g} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
        return [StepResult(*r) for r in torch.load(out, weights_only=True)]


def report(agreements: Sequence[Agreement], ranks: Sequence[int]) -> str:
    """The table `main` prints: per schedule, whether the losses are bitwise equal
    to the single process's, and how far the gradients are from its."""
    lines = [f"{'schedule':9s} {'ranks':>5s} {'losses':>7s} {'grads':>7s} "
             f"{'max calc_diff':>13s} {'max rel diff':>12s}",
             f"{'':9s} {'':5s} {'equal':>7s} {'equal':>7s}"]
    for a, n in zip(agreements, ranks):
        lines.append(f"{a.method:9s} {n:>5d} {str(a.losses_equal):>7s} "
                     f"{f'{a.grads_equal}/{a.n_params}':>7s} "
                     f"{a.max_grad_diff:>13.1e} {a.max_rel_diff:>12.1e}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run under torchrun, e.g. `torchrun --nproc-per-node 4 -m dsv3_lite.pipeline`:
    the chosen schedules of a model of --stages stages (default: one per process;
    DualPipeV runs them on half as many ranks) run one after the other, and rank 0
    prints how each step compares with a single process."""
    parser = argparse.ArgumentParser(prog="torchrun ... -m dsv3_lite.pipeline",
                                     description=main.__doc__)
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        default=list(METHODS))
    parser.add_argument("--stages", type=int, default=None)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120.0)
    opts = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("run it under torchrun (e.g. torchrun --nproc-per-node 4 -m "
                     "dsv3_lite.pipeline); from Python, use run_spawned")
    stages = opts.stages or int(os.environ["WORLD_SIZE"])
    schedules = [build(m, stages // 2 if m == "DualPipeV" else stages,
                       opts.micro_batches) for m in opts.methods]
    workload = Workload(n_stages=stages, n_micro_batches=opts.micro_batches)
    for schedule in schedules:
        simulate(schedule)
    dist.init_process_group("gloo",
                            timeout=datetime.timedelta(seconds=opts.timeout))
    try:
        results = run_rank(schedules, workload)
        if dist.get_rank() != 0:
            return 0
        reference = reference_step(workload)
        agreements = [compare(r, reference) for r in results]
        print(report(agreements, [s.n_ranks for s in schedules]), flush=True)
        ok = all(a.losses_equal and a.max_grad_diff < 1e-13 for a in agreements)
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


__all__ = ["KINDS", "METHODS", "Op", "Pair", "Slot", "ops_of", "Schedule",
           "check_schedule", "one_f_one_b", "zb1p", "dualpipe", "dualpipev",
           "BUILDERS", "build", "Costs", "Interval", "Timeline", "Deadlock",
           "simulate", "peak_activations", "table2_bubble", "OverlapCosts", "Span",
           "overlap_pair", "communication_hidden", "exposed_communication",
           "Stage", "Workload", "StepResult", "reference_step", "RankRunner",
           "run_rank", "Agreement", "compare", "free_port",
           "run_spawned", "report", "main"]


if __name__ == "__main__":
    sys.exit(main())
