"""The loop pipeline's task schedule: which forward and backward pass each stage runs, in order.

A microbatch's work on stage s is a chain of *passes* (loop iterations, then the `fd`
estimator's evaluations of the core map): forward F(m, k) of pass k on every stage in turn, the
state going round the ring (stage P-1 feeds stage 0 the input of pass k + 1), then, once the
last stage has its loss, backward B(m, k) of every gradient-carrying pass in reverse, each
stage sending its input's gradient to the stage it came from:

    F(m, k) on s      needs F(m, k) on s - 1;  on stage 0 (k > 0): F(m, k - 1) on P - 1
    B(m, k) on s      needs B(m, k) on s + 1;  on P - 1: the loss (after F(m, K - 1) on P - 1)
                      and, when pass k's output carries a graph into pass k + 1, B(m, k + 1) on 0

`build` simulates all stages in unit ticks (every task one tick, a message usable the tick after
it is sent) and returns each stage's task order; every rank computes the same lists from
(P, M, the pass plan, the order). A stage that executes its list with non-blocking sends and
receives waiting in that order cannot deadlock: every receive's message was sent at an earlier
simulated tick by a stage executing its own list.

    1f1b   backward first; a stage starts a new microbatch only while fewer than min(P, M) are in
           flight on it (started, backward not finished): activations of at most P microbatches
           are held, whatever M, and a freed slot is refilled at once (one fill, one drain).
    gpipe  forward first, no limit: all M microbatches' activations are held until the drain.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from stars_scale.parallel.layout import round_size


@dataclass(frozen=True)
class Task:
    op: str  # "F" forward or "B" backward
    micro: int
    k: int  # the pass


def linked(grads: tuple[bool, ...], iters: tuple[bool, ...], k: int) -> bool:
    """Whether pass k's output carries a graph into pass k + 1 (two gradient-carrying iterations)."""
    return k + 1 < len(grads) and iters[k] and iters[k + 1] and grads[k] and grads[k + 1]


@lru_cache(maxsize=64)
def build(pp: int, microbatches: int, grads: tuple[bool, ...], iters: tuple[bool, ...],
          order: str) -> tuple[tuple[Task, ...], ...]:
    """Each stage's tasks in execution order. `grads[k]`: pass k carries gradients (has a backward);
    `iters[k]`: pass k is a loop iteration (else an estimator evaluation).

    1f1b: a stage holds at most min(P, M) microbatches' gradient-carrying passes plus `slack`
    passes. Packing the ring perfectly can need a pass or two more than min(P, M) microbatches
    (stage 0 starts the next microbatch before the first backward reaches it), so the slack is
    the smallest of 0..P - 1 whose simulated idle time is the least."""
    if order not in ("1f1b", "gpipe"):
        raise ValueError(f"parallel.schedule: expected 1f1b or gpipe, got {order!r}")
    if order == "gpipe":
        return _greedy(pp, microbatches, grads, iters, order, 0)
    best = None
    for slack in range(max(1, pp)):
        sched = _greedy(pp, microbatches, grads, iters, order, slack)
        idle = sum(simulated_ticks(pp, sched, grads, iters)[1])
        if best is None or idle < best[0]:
            best = (idle, sched)
    return best[1]


def _greedy(pp: int, microbatches: int, grads: tuple[bool, ...], iters: tuple[bool, ...], order: str,
            slack: int) -> tuple[tuple[Task, ...], ...]:
    P, M, K = pp, microbatches, len(grads)
    limit = round_size(order, P, M)
    back = [k for k in range(K - 1, -1, -1) if grads[k]]
    done: dict[tuple[str, int, int, int], int] = {}  # (op, m, k, stage) -> tick it finished
    started = [0] * P  # microbatches started per stage (they start in order)
    finished = [[0] * M for _ in range(P)]  # backward passes done per (stage, microbatch)
    nxt_f = [[0] * M for _ in range(P)]  # next forward pass per (stage, microbatch)
    nxt_b = [[0] * M for _ in range(P)]  # index into `back` per (stage, microbatch)
    out: list[list[Task]] = [[] for _ in range(P)]
    total = P * M * (K + len(back))
    t, n = 0, 0

    def ready(key, tick):
        return key in done and done[key] < tick

    def can_forward(s, m, tick):
        k = nxt_f[s][m]
        if k >= K:
            return False
        if s > 0:
            return ready(("F", m, k, s - 1), tick)
        return k == 0 or ready(("F", m, k - 1, P - 1), tick)

    def can_backward(s, m, tick):
        i = nxt_b[s][m]
        if i >= len(back):
            return False
        k = back[i]
        if s < P - 1:
            return ready(("B", m, k, s + 1), tick)
        if not ready(("F", m, K - 1, P - 1), tick):
            return False
        return not linked(grads, iters, k) or ready(("B", m, k + 1, 0), tick)

    def held(s):  # gradient-carrying passes whose activations stage s holds
        return sum(sum(grads[:nxt_f[s][m]]) - finished[s][m] for m in range(started[s]))

    def live(s):
        return sum(1 for m in range(started[s]) if finished[s][m] < len(back) or nxt_f[s][m] < K)

    budget = limit * len(back) + slack
    stalled = False
    while n < total:
        progressed = False
        for s in range(P):
            room = held(s) < budget
            fwd = [m for m in range(started[s]) if can_forward(s, m, t) and (room or not grads[nxt_f[s][m]])]
            if started[s] < M and can_forward(s, started[s], t) and (room or not grads[0]) \
                    and live(s) < limit + (1 if order == "1f1b" else 0):
                fwd.append(started[s])
            if not fwd and stalled:  # the budget blocks every stage: the oldest forward goes on
                fwd = [m for m in range(started[s]) if can_forward(s, m, t)][:1]
            bwd = [m for m in range(started[s]) if can_backward(s, m, t)]
            if fwd:
                op, m = "F", min(fwd)
                k = nxt_f[s][m]
                nxt_f[s][m] += 1
                started[s] = max(started[s], m + 1)
            elif bwd:
                op, m = "B", min(bwd)
                k = back[nxt_b[s][m]]
                nxt_b[s][m] += 1
                finished[s][m] += 1
            else:
                continue
            done[(op, m, k, s)] = t
            out[s].append(Task(op, m, k))
            n += 1
            progressed = True
        stalled = not progressed
        t += 1
        if t > 4 * total + 4 * P:
            raise RuntimeError("pipeline schedule did not converge")  # a bug, never user input
    return tuple(tuple(ts) for ts in out)


def simulated_ticks(pp: int, schedule: tuple[tuple[Task, ...], ...], grads: tuple[bool, ...],
                    iters: tuple[bool, ...]) -> tuple[int, list[int]]:
    """Replays `schedule` in unit ticks (each stage in its order, as soon as its inputs are there):
    (the step's span in ticks, each stage's idle ticks within it)."""
    K = len(grads)
    done: dict[tuple[str, int, int, int], int] = {}
    pos = [0] * pp
    t = 0
    while any(pos[s] < len(schedule[s]) for s in range(pp)):
        for s in range(pp):
            if pos[s] == len(schedule[s]):
                continue
            task = schedule[s][pos[s]]
            m, k = task.micro, task.k
            if task.op == "F":
                deps = [("F", m, k, s - 1)] if s > 0 else ([("F", m, k - 1, pp - 1)] if k > 0 else [])
            elif s < pp - 1:
                deps = [("B", m, k, s + 1)]
            else:
                deps = [("F", m, K - 1, pp - 1)] + ([("B", m, k + 1, 0)] if linked(grads, iters, k) else [])
            if all(d in done and done[d] < t for d in deps):
                done[(task.op, m, k, s)] = t
                pos[s] += 1
        t += 1
        if t > 8 * sum(len(x) for x in schedule) + 8:
            raise RuntimeError("pipeline schedule deadlocks")
    return t, [t - len(schedule[s]) for s in range(pp)]


def bubble(pp: int, microbatches: int, grads: tuple[bool, ...], iters: tuple[bool, ...], order: str) -> float:
    """Idle fraction of the stages over the step, from the schedule's task list (not timed)."""
    sched = build(pp, microbatches, grads, iters, order)
    span, idle = simulated_ticks(pp, sched, grads, iters)
    return sum(idle) / (pp * span)


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
