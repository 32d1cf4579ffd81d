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
from stars_scale.parallel.testing import make_cfg, spawn

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
        # P = 2 microbatches' passes at a time; the microbatches' token ids are views of the
        # step's batch, so the storage the embedding saves grows by M·rows·T·8 bytes (< 1%)
        assert f[0] > 0 and max(f) <= 1.01 * min(f), (stage, f)
        assert g[0] == f[0] and g[1] >= 1.9 * g[0] and g[2] >= 1.9 * g[1], (stage, g)  # all M held
    # a new microbatch starts on a stage as old backwards free room: at most P + 1 partly in flight
    assert [measured[("1f1b", M, 0)][0]["in_flight"] for M in (2, 4, 8)] == [2, 3, 3]
    assert [measured[("gpipe", M, 0)][0]["in_flight"] for M in (2, 4, 8)] == [2, 4, 8]


def test_schedules_train_identically(measured):
    for M, zero in ((2, 0), (4, 0), (8, 0), (4, 2)):
        a = measured[("1f1b", M, zero)][1]["rows"]  # the last stage logs
        b = measured[("gpipe", M, zero)][1]["rows"]
        assert measured[("1f1b", M, zero)][1]["in_flight"] == min(M, 3)
        for x, y in zip(a, b):
            for key in ("loss", "ce", "penalty", "rho", "grad_norm"):
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (M, zero, x["step"], key)


def _plan(n_free: int, n_grad: int, fd_evals: int = 0, penalty: bool = True):
    grads = (False,) * n_free + (True,) * n_grad + tuple(penalty and i in (0, fd_evals - 1) for i in range(fd_evals))
    return grads, (True,) * (n_free + n_grad) + (False,) * fd_evals


@pytest.mark.parametrize("M", [2, 4, 8, 16])
def test_1f1b_bubble_is_no_worse_than_gpipe(M):
    """P = 2, r = 8 gradient-carrying iterations: one fill and one drain per step, as gpipe, with
    gpipe's formula (P - 1) / (r·M + P - 1) per direction; counted from the task lists."""
    P, r = 2, 8
    grads, iters = _plan(0, r)
    span = {}
    for order in ("1f1b", "gpipe"):
        sched = schedule.build(P, M, grads, iters, order)
        assert sorted(sched[0], key=str) == sorted(sched[1], key=str)  # every task on every stage, once
        assert len(sched[0]) == 2 * r * M
        span[order], idle = schedule.simulated_ticks(P, sched, grads, iters)
        span[order + " idle"] = max(idle)
    assert span["1f1b idle"] <= span["gpipe idle"], span
    assert span["gpipe idle"] / span["gpipe"] == pytest.approx((P - 1) / (r * M + P - 1))
    assert span["1f1b"] <= span["gpipe"]


@pytest.mark.parametrize("P,M,plan", [(2, 5, (1, 2, 3)), (3, 7, (2, 3, 3)), (4, 9, (0, 4, 0)), (3, 2, (1, 1, 2))])
def test_1f1b_holds_at_most_p_microbatches_of_passes(P, M, plan):
    """Whatever the plan (free iterations, estimator passes), a stage never holds more than
    min(P, M) microbatches' gradient-carrying passes plus one, and every backward follows its forward."""
    grads, iters = _plan(*plan)
    sched = schedule.build(P, M, grads, iters, "1f1b")
    schedule.simulated_ticks(P, sched, grads, iters)  # every dependency met (no deadlock)
    peaks = []
    for tasks in sched:
        held = most = 0
        seen = set()
        for t in tasks:
            if t.op == "F":
                seen.add((t.micro, t.k))
                held += grads[t.k]
            else:
                assert (t.micro, t.k) in seen
                held -= 1
            most = max(most, held)
        assert most <= min(P, M) * sum(grads) + 1, (most, P, M, plan)
        peaks.append(most)
    assert peaks == schedule.peak_held(P, M, grads, iters, "1f1b")
