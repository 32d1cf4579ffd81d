"""The loop pipeline's task schedule: which forward and backward pass each stage runs, in order.

A microbatch's work on stage s is a chain of *passes* (loop iterations, then the `fd`
estimator's evaluations of the core map): forward F(m, k) of pass k on every stage in turn, the
state going round the ring (stage P-1 feeds stage 0 the input of pass k + 1), then, once the
last stage has its loss, backward B(m, k) of every gradient-carrying pass in reverse, each
stage sending its input's gradient to the stage it came from:

    F(m, k) on s      needs F(m, k) on s - 1;  on stage 0 (k > 0): F(m, k - 1) on P - 1
    B(m, k) on s      needs B(m, k) on s + 1;  on P - 1: the loss (after F(m, K - 1) on P - 1)
                      and, when pass k's output carries a graph into pass k + 1, B(m, k + 1) on 0

So pass k on stage s is virtual stage k·P + s of a linear pipeline K·P deep, with the passes
assigned round-robin to the stages: the layout of Megatron's interleaved (virtual-pipeline)
schedule, whose order `1f1b` follows. The microbatches go in groups of G ≥ P (G = P when P
divides M); every stage runs the forwards in one order (group by group, within a group pass by
pass, within a pass microbatch by microbatch: the group fills the ring) and the backwards in
the matching order (passes reversed), and interleaves the two lists:

    1f1b   the next forward while the stage holds fewer gradient-carrying passes (free passes
           hold nothing) than it holds when the group's first microbatch reaches its loss plus
           2(P − 1 − s), and has fewer than 2G microbatches started and unfinished, else the next
           backward: Megatron's warm-up, then one forward, one backward. With every iteration
           carrying gradients that is n_b·G + P − 1 − 2s passes (n_b per microbatch): about G
           microbatches' activations whatever M; one fill and one drain per step, as gpipe.
    gpipe  one group of all M and no limit: every microbatch's activations held until the drain.

`build` simulates all stages in unit ticks (every task one tick, a message usable the tick after
it is sent; a stage runs its next forward or backward as soon as it is allowed and ready) and
returns each stage's task list; every rank computes the same lists from (P, M, the pass plan,
the order). A stage that executes its list with non-blocking sends and receives waiting in that
order cannot deadlock: every receive's message was sent at an earlier simulated tick by a stage
executing its own list.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

ORDERS = ("1f1b", "gpipe")


@dataclass(frozen=True)
class Task:
    op: str  # "F" forward or "B" backward
    micro: int
    k: int  # the pass


def linked(grads: tuple[bool, ...], iters: tuple[bool, ...], k: int) -> bool:
    """Whether pass k's output carries a graph into pass k + 1 (two gradient-carrying iterations)."""
    return k + 1 < len(grads) and iters[k] and iters[k + 1] and grads[k] and grads[k + 1]


def needs(task: Task, stage: int, pp: int, grads: tuple[bool, ...], iters: tuple[bool, ...]) -> list[tuple]:
    """The tasks, as (op, micro, pass, stage), whose results `task` on `stage` takes."""
    m, k = task.micro, task.k
    if task.op == "F":
        if stage > 0:
            return [("F", m, k, stage - 1)]
        return [("F", m, k - 1, pp - 1)] if k > 0 else []
    if stage < pp - 1:
        return [("B", m, k, stage + 1)]
    return [("F", m, len(grads) - 1, pp - 1)] + ([("B", m, k + 1, 0)] if linked(grads, iters, k) else [])


def groups(pp: int, microbatches: int, order: str) -> list[range]:
    """The microbatches in the groups that fill the ring: 1f1b ⌊M/P⌋ groups of ≥ P (sizes differ
    by at most one, the larger last), gpipe one group of all M."""
    n = max(1, microbatches // pp) if order == "1f1b" else 1
    base, extra = divmod(microbatches, n)
    sizes = [base + (i >= n - extra) for i in range(n)]
    starts = [sum(sizes[:i]) for i in range(n)]
    return [range(a, a + size) for a, size in zip(starts, sizes)]


@lru_cache(maxsize=64)
def build(pp: int, microbatches: int, grads: tuple[bool, ...], iters: tuple[bool, ...],
          order: str) -> tuple[tuple[Task, ...], ...]:
    """Each stage's tasks in execution order. `grads[k]`: pass k carries gradients (has a backward);
    `iters[k]`: pass k is a loop iteration (else an estimator evaluation)."""
    if order not in ORDERS:
        raise ValueError(f"parallel.schedule: expected one of {ORDERS}, got {order!r}")
    P, K = pp, len(grads)
    back = [k for k in range(K - 1, -1, -1) if grads[k]]
    gs = groups(P, microbatches, order)
    forwards = [Task("F", m, k) for g in gs for k in range(K) for m in g]
    backwards = [Task("B", m, k) for g in gs for k in back for m in g]
    G = max(map(len, gs))
    bounded = order == "1f1b" and G >= P  # fewer microbatches than stages: all of them, as gpipe
    # passes held when the group's first microbatch reaches its loss (all of the group's when
    # the last passes carry no gradient, e.g. an estimate without the penalty)
    first_loss = G * sum(grads[:-1]) + grads[-1] if grads else 0
    limit = [first_loss + 2 * (P - 1 - s) if bounded else math.inf for s in range(P)]
    per_micro = K + len(back)
    left = [[per_micro] * microbatches for _ in range(P)]  # tasks to go per (stage, microbatch)
    nf, nb, held, live = [0] * P, [0] * P, [0] * P, [0] * P  # next forward/backward, passes, started
    out: list[list[Task]] = [[] for _ in range(P)]
    done: dict[tuple, int] = {}
    t = 0
    while any(nf[s] < len(forwards) or nb[s] < len(backwards) for s in range(P)):
        moved = False
        for s in range(P):
            f = forwards[nf[s]] if nf[s] < len(forwards) else None
            b = backwards[nb[s]] if nb[s] < len(backwards) else None
            allowed = f is not None and (held[s] < limit[s] or not grads[f.k]) \
                and (left[s][f.micro] < per_micro or live[s] < 2 * G or not bounded)
            task = next((x for x in ((f if allowed else None), b)
                         if x is not None and all(done.get(d, t) < t for d in needs(x, s, P, grads, iters))), None)
            if task is None:
                continue
            moved = True
            done[(task.op, task.micro, task.k, s)] = t
            out[s].append(task)
            if task.op == "F":
                nf[s] += 1
                held[s] += grads[task.k]
            else:
                nb[s] += 1
                held[s] -= 1
            live[s] += left[s][task.micro] == per_micro
            left[s][task.micro] -= 1
            live[s] -= left[s][task.micro] == 0
        if not moved:  # never seen: P = 2..8, M = 1..3P+1 and 4P, 92 pass plans (the tests run part)
            raise RuntimeError(f"pipeline schedule deadlocks (P={P}, M={microbatches}, {order}): a bug")
        t += 1
    return tuple(tuple(ts) for ts in out)


def simulated_ticks(pp: int, schedule: tuple[tuple[Task, ...], ...], grads: tuple[bool, ...],
                    iters: tuple[bool, ...]) -> tuple[int, list[int]]:
    """Replays `schedule` in unit ticks (each stage in its order, as soon as its inputs are there):
    (the step's span in ticks, each stage's idle ticks within it)."""
    done: dict[tuple, int] = {}
    pos = [0] * pp
    t = 0
    while any(pos[s] < len(schedule[s]) for s in range(pp)):
        for s in range(pp):
            if pos[s] < len(schedule[s]):
                task = schedule[s][pos[s]]
                if all(done.get(d, t) < t for d in needs(task, s, pp, grads, iters)):
                    done[(task.op, task.micro, task.k, s)] = t
                    pos[s] += 1
        t += 1
        if t > 8 * sum(len(x) for x in schedule) + 8:
            raise RuntimeError("pipeline schedule deadlocks")
    return t, [t - len(schedule[s]) for s in range(pp)]


def max_in_flight(schedule: tuple[Task, ...], backward_passes: int, passes: int) -> int:
    """The most microbatches a stage's task list has started and not finished at once."""
    seen: dict[int, int] = {}
    live = most = 0
    for task in schedule:
        left = seen.get(task.micro, passes + backward_passes)
        if left == passes + backward_passes:
            live += 1
            most = max(most, live)
        seen[task.micro] = left - 1
        if left - 1 == 0:
            live -= 1
    return most


def peak_held(pp: int, microbatches: int, grads: tuple[bool, ...], iters: tuple[bool, ...],
              order: str) -> list[int]:
    """The most gradient-carrying passes whose activations each stage holds at once (the planner's
    activation count: divided by the passes per microbatch, the microbatches in flight)."""
    out = []
    for tasks in build(pp, microbatches, grads, iters, order):
        held = most = 0
        for task in tasks:
            held += grads[task.k] if task.op == "F" else -1
            most = max(most, held)
        out.append(most)
    return out
