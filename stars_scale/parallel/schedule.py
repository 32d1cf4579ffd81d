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

    1f1b   forward first while the stage holds fewer than min(P, M) microbatches' gradient-
           carrying passes (+ at most one pass of slack), else backward: activations of at most
           ~P microbatches are held whatever M, and freed room is refilled at once.
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

    1f1b: a stage holds at most min(P, M) microbatches' gradient-carrying passes plus a slack of
    0 or 1 pass. Packing the ring perfectly can need one pass more than min(P, M) microbatches
    (stage 0 starts the next microbatch before the first backward reaches it): the slack is 1
    only where that gives less simulated idle time."""
    if order not in ("1f1b", "gpipe"):
        raise ValueError(f"parallel.schedule: expected 1f1b or gpipe, got {order!r}")
    if order == "gpipe":
        return _greedy(pp, microbatches, grads, iters, order, 0)
    best = None
    for slack in (0, 1):
        sched = _greedy(pp, microbatches, grads, iters, order, slack)
        idle = sum(simulated_ticks(pp, sched, grads, iters)[1])
        if best is None or idle < best[0]:
            best = (idle, sched)
    return best[1]


def _greedy(pp: int, microbatches: int, grads: tuple[bool, ...], iters: tuple[bool, ...], order: str,
            slack: int) -> tuple[tuple[Task, ...], ...]:
    """The simulation: every tick each stage runs its smallest-numbered ready forward while it
    has room (1f1b: fewer than min(P, M) microbatches' gradient-carrying passes plus `slack` held,
    at most min(P, M) + 1 microbatches started and unfinished), else its smallest ready backward.
    A task becomes ready the tick after its inputs are done (event-driven: O(tasks))."""
    P, M, K = pp, microbatches, len(grads)
    limit = round_size(order, P, M)
    back = [k for k in range(K - 1, -1, -1) if grads[k]]
    budget = limit * len(back) + slack
    cap = limit + (1 if order == "1f1b" else 0)
    done: set[tuple[str, int, int, int]] = set()  # (op, m, k, stage)
    nxt_f = [[0] * M for _ in range(P)]  # next forward pass per (stage, microbatch)
    nxt_b = [[0] * M for _ in range(P)]  # index into `back` per (stage, microbatch)
    fready: list[set[int]] = [set() for _ in range(P)]  # microbatches whose next forward is ready
    bready: list[set[int]] = [set() for _ in range(P)]
    started, held, live = [0] * P, [0] * P, [0] * P
    out: list[list[Task]] = [[] for _ in range(P)]
    total = P * M * (K + len(back))
    if M:
        fready[0].add(0)

    def f_ready(m, k, s):
        if k >= K or nxt_f[s][m] != k:
            return False
        if s > 0:
            return ("F", m, k, s - 1) in done
        return k == 0 or ("F", m, k - 1, P - 1) in done

    def b_ready(m, s):
        i = nxt_b[s][m]
        if i >= len(back):
            return False
        k = back[i]
        if s < P - 1:
            return ("B", m, k, s + 1) in done
        return ("F", m, K - 1, P - 1) in done and (not linked(grads, iters, k) or ("B", m, k + 1, 0) in done)

    t = n = 0
    stalled = False
    while n < total:
        finished: list[tuple[str, int, int, int]] = []
        for s in range(P):
            room = held[s] < budget
            fwd = [m for m in fready[s] if room or not grads[nxt_f[s][m]]]
            fwd = [m for m in fwd if m < started[s] or live[s] < cap]
            if not fwd and stalled:  # the budget blocks every stage: the oldest forward goes on
                fwd = [min(m for m in fready[s] if m < started[s])] if any(m < started[s] for m in fready[s]) else []
            if fwd:
                op, m = "F", min(fwd)
                k = nxt_f[s][m]
                fready[s].discard(m)
                nxt_f[s][m] += 1
                held[s] += grads[k]
                if m == started[s]:
                    started[s] += 1
                    live[s] += 1
            elif bready[s]:
                op, m = "B", min(bready[s])
                k = back[nxt_b[s][m]]
                bready[s].discard(m)
                nxt_b[s][m] += 1
                held[s] -= 1
            else:
                continue
            if nxt_f[s][m] == K and nxt_b[s][m] == len(back):
                live[s] -= 1
            out[s].append(Task(op, m, k))
            finished.append((op, m, k, s))
            n += 1
        stalled = not finished
        done.update(finished)
        for op, m, k, s in finished:  # what the finished tasks make ready for the next tick
            cands = [("F", m, s)]
            if op == "F":
                cands += [("F", m, s + 1)] if s < P - 1 else [("F", m, 0), ("B", m, s)]
                if s == 0 and k == 0 and m + 1 < M:
                    cands.append(("F", m + 1, 0))
            else:
                cands += [("B", m, s)] + ([("B", m, s - 1)] if s > 0 else [("B", m, P - 1)])
            for c_op, c_m, c_s in cands:
                if c_op == "F" and f_ready(c_m, nxt_f[c_s][c_m], c_s):
                    fready[c_s].add(c_m)
                elif c_op == "B" and b_ready(c_m, c_s):
                    bready[c_s].add(c_m)
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
