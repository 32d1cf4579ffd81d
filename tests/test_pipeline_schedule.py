"""The loop pipeline's schedules: 1f1b holds at most P microbatches' activations per stage (flat
in M), gpipe holds all M (growing); both train identically; 1f1b's ring stays as full as gpipe's.

Memory is measured, not modelled: the most bytes autograd holds for backward at once (unique
storages, parameters excluded: `pipeline.HeldBytes`, a saved-tensors hook) on each stage. The
bubble is counted from the schedule's task lists (`schedule.simulated_ticks`), not timed.
"""
from __future__ import annotations

import tempfile

import pytest

from stars_scale.parallel import schedule
from multirank import make_cfg, spawn

ROWS = 2  # rows per microbatch, whatever M


def _measure(rank: int, world: int, settings: list, out: str):
    from stars_scale.train.trainer import Trainer

    got = []
    for i, (schedule, M, zero) in enumerate(settings):
        cfg = make_cfg({"pp": 2, "microbatches": M, "schedule": schedule, "zero": zero}, {"steps": 2})
        cfg.data.batch_size = ROWS * M
        cfg.depth.dist, cfg.depth.value = "fixed", 3
        t = Trainer(cfg, f"{out}/s{i}")
        t.engine.measure = True
        rows = [t.train_step() for _ in range(2)]
        got.append({"peak": t.engine.peak_saved_bytes, "in_flight": t.engine.pipeline.stats.in_flight, "rows": rows})
    return got


@pytest.fixture(scope="module")
def measured():
    # zero 2 (DeepSpeed, dp = 1): one optimizer backward per step, whatever the schedule
    settings = [(s, M, 0) for s in ("1f1b", "gpipe") for M in (2, 4, 8)] + [(s, 4, 2) for s in ("1f1b", "gpipe")]
    with tempfile.TemporaryDirectory() as out:
        per_rank = spawn(_measure, 2, settings, out)
    return {key: [r[i] for r in per_rank] for i, key in enumerate(settings)}


def test_1f1b_memory_is_flat_in_microbatches_and_gpipe_grows(measured):
    for stage in range(2):
        f = [measured[("1f1b", M, 0)][stage]["peak"] for M in (2, 4, 8)]
        g = [measured[("gpipe", M, 0)][stage]["peak"] for M in (2, 4, 8)]
        # groups of P = 2 microbatches: flat from M = 2P on (the microbatches' token ids are views
        # of the step's batch, so the storage the embedding saves grows by M·rows·T·8 bytes, < 1%);
        # M = P holds the one group alone, without the warm-up's extra pass(es) and the next group
        assert f[0] > 0 and f[0] <= f[1] <= 1.2 * f[0] and f[2] <= 1.01 * f[1], (stage, f)
        assert g[0] >= f[0] and g[1] >= 1.9 * g[0] and g[2] >= 1.9 * g[1], (stage, g)  # all M held
    # a new group of P microbatches starts while the last one's backwards run: at most 2P in flight
    assert [measured[("1f1b", M, 0)][0]["in_flight"] for M in (2, 4, 8)] == [2, 4, 4]
    assert [measured[("gpipe", M, 0)][0]["in_flight"] for M in (2, 4, 8)] == [2, 4, 8]


def test_schedules_train_identically(measured):
    for M, zero in ((2, 0), (4, 0), (8, 0), (4, 2)):
        a = measured[("1f1b", M, zero)][1]["rows"]  # the last stage logs
        b = measured[("gpipe", M, zero)][1]["rows"]
        assert measured[("1f1b", M, zero)][1]["in_flight"] == min(M, 4)
        # the two orders add the passes' gradients up in different orders (last bits), which the
        # fd estimator's 1/ε magnifies in the next step: the equivalence tests' 1e-5
        for x, y in zip(a, b):
            for key in ("loss", "ce", "penalty", "rho", "grad_norm"):
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-9), (M, zero, x["step"], key)


def _plan(n_free: int, n_grad: int, fd_evals: int = 0, penalty: bool = True):
    grads = (False,) * n_free + (True,) * n_grad + tuple(penalty and i in (0, fd_evals - 1) for i in range(fd_evals))
    return grads, (True,) * (n_free + n_grad) + (False,) * fd_evals


def _check(P: int, M: int, grads, iters, order: str) -> tuple[list[int], list[int], list[int]]:
    """Every stage runs every task once, each backward after its forward, and the lists replay
    without deadlock; returns (idle ticks, peak held passes, microbatches in flight) per stage."""
    sched = schedule.build(P, M, grads, iters, order)
    want = sorted([("F", m, k) for m in range(M) for k in range(len(grads))]
                  + [("B", m, k) for m in range(M) for k in range(len(grads)) if grads[k]])
    for tasks in sched:
        assert sorted((t.op, t.micro, t.k) for t in tasks) == want
        seen = set()
        for t in tasks:
            assert t.op == "F" or (t.micro, t.k) in seen
            seen.add((t.micro, t.k))
    _, idle = schedule.simulated_ticks(P, sched, grads, iters)
    flight = [schedule.max_in_flight(tasks, sum(grads), len(grads)) for tasks in sched]
    return idle, schedule.peak_held(P, M, grads, iters, order), flight


# (P, r, M): idle ticks of the busiest stage, 1f1b = gpipe = 2(P - 1) (one fill, one drain), and
# 1f1b's peak held gradient-carrying passes per stage (stage s: at most r·P + P - 1 - 2s), the same
# for M = 2P and 4P. The greedy order this replaced idled 34 ticks at (4, 8, 16).
TABLE = {(2, 8, 8): [17, 15], (3, 4, 12): [14, 12, 10], (4, 8, 16): [35, 33, 31, 29], (4, 1, 16): [7, 5, 3, 1]}


@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_1f1b_idles_no_more_than_gpipe_and_holds_about_p_microbatches(P, r):
    """Every iteration carrying gradients, M = P, 2P, 4P: 1f1b's idle ticks on every stage are at
    most gpipe's; it holds about P microbatches' passes (flat in M), gpipe all M; at most 2P
    microbatches partly in flight (their encodings on stage 0)."""
    grads = iters = (True,) * r
    held = {}
    for M in (P, 2 * P, 4 * P):
        g_idle, g_held, g_flight = _check(P, M, grads, iters, "gpipe")
        idle, held[M], flight = _check(P, M, grads, iters, "1f1b")
        assert g_idle == [2 * (P - 1)] * P and g_held == [r * M] * P and g_flight == [M] * P
        assert all(a <= b for a, b in zip(idle, g_idle)), (M, idle, g_idle)
        assert all(h <= r * P + P - 1 - 2 * s for s, h in enumerate(held[M])), (M, held[M])
        assert max(flight) <= 2 * P
        if (P, r, M) in TABLE:
            assert held[M] == TABLE[(P, r, M)]
    assert held[2 * P] == held[4 * P] and max(held[P]) <= r * P


@pytest.mark.parametrize("P,plan", [(2, (1, 2, 3)), (3, (2, 3, 3)), (4, (0, 4, 2)), (3, (1, 1, 2)), (4, (3, 8, 0)),
                                    (3, (1, 2, 3, False)), (4, (0, 3, 2, False))])
def test_1f1b_with_free_iterations_and_estimator_passes(P, plan):
    """Free iterations (no backward), the estimator's passes (not linked to the next; without the
    penalty none carries gradients): for M a multiple of P no more idle than gpipe and about P
    microbatches held; for any M (groups of G ≥ P when P does not divide M), no deadlock, at
    most n_b·G + 2(P − 1) passes held and 2G microbatches in flight."""
    grads, iters = _plan(*plan)
    nb = sum(grads)
    for M in range(1, 4 * P + 2):
        idle, held, flight = _check(P, M, grads, iters, "1f1b")
        G = max(len(g) for g in schedule.groups(P, M, "1f1b"))
        assert G == (P if M % P == 0 else M) or (M > 2 * P and P <= G < 2 * P)
        assert max(held) <= nb * max(G, M if M < P else 0) + 2 * (P - 1) and max(flight) <= 2 * G, (M, held, flight)
        if M % P == 0:
            g_idle = _check(P, M, grads, iters, "gpipe")[0]
            assert all(a <= b for a, b in zip(idle, g_idle)), (M, idle, g_idle)


def test_schedules_never_deadlock():
    """P up to 6, M from 1 to 2P + 1, mixed pass plans: the simulation finishes, the lists replay."""
    for P in range(2, 7):
        for M in range(1, 2 * P + 2):
            for plan in ((0, 1, 0), (2, 1, 3), (1, 5, 2), (3, 2, 5), (1, 2, 3, False)):
                for order in schedule.ORDERS:
                    _check(P, M, *_plan(*plan), order)
