"""Every parallel layout trains exactly like one process: same losses, ρ̂, penalty, parameters.

Spawned gloo ranks on CPU. One process group runs several layouts one after another (process
groups are the expensive part on 2 cores). The single-process reference is the plain `Trainer`
with 2 microbatches per step; a layout with dp ranks and M microbatches each is the same
computation (microbatch j of dp rank r is global microbatch r·M + j).

The fd estimator divides by ε, so it magnifies the last-bit differences that a different
reduction order (tensor-parallel all-reduce, DP averaging) makes: with the default ε
(~sqrt(fp32 eps)·‖h‖) ρ̂ agrees to ~3e-5 only; `stars.fd_eps: 0.5` keeps it at ~1e-7.
"""
from __future__ import annotations

import math
import tempfile

import pytest
import torch

from multirank import STEPS, make_cfg, spawn


def _train_layouts(rank: int, world: int, layouts: list, out: str):
    from stars_scale.train.trainer import Trainer

    results = []
    for i, layout in enumerate(layouts):
        t = Trainer(make_cfg(*layout), f"{out}/layout{i}")
        rows = [t.train_step() for _ in range(STEPS)]
        full = t.full_model()
        results.append({"rows": rows, "depths": t.depth_history, "logger": t.reports,
                        "state": None if full is None else {k: v.clone() for k, v in full.state_dict().items()}})
    return results


def _one_process(microbatches: int, sections: dict | None = None):
    from stars_scale.train.trainer import Trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        t = Trainer(make_cfg({"microbatches": microbatches}, None, sections), d)
        rows = [t.train_step() for _ in range(STEPS)]
        return rows, {k: v.clone() for k, v in t.model.state_dict().items()}


@pytest.fixture(scope="module")
def reference():
    return _one_process(2)


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def _check(name: str, per_rank: list, reference) -> None:
    ref_rows, ref_state = reference
    # every rank of the layout drew the same depth at every step, equal to the reference's
    depths = {tuple(r["depths"]) for r in per_rank}
    assert depths == {tuple(row["depth"] for row in ref_rows)}, (name, depths)
    loggers = [r for r in per_rank if r["logger"]]
    assert len(loggers) == 1, name
    got = loggers[0]
    for a, b in zip(got["rows"], ref_rows):
        assert a["step"] == b["step"]
        for key in ("loss", "ce", "penalty", "rho", "grad_norm"):
            if b[key] is None:
                assert a[key] is None, (name, a["step"], key)
            else:
                assert _close(a[key], b[key]), (name, a["step"], key, a[key], b[key])
    assert any(row["penalty"] is not None for row in ref_rows[1:])  # the penalty was on
    # every rank reported the same metrics (broadcast from the logger)
    for r in per_rank:
        assert [row["loss"] for row in r["rows"]] == [row["loss"] for row in got["rows"]]
    state = got["state"]
    assert set(state) == set(ref_state)
    for k, v in ref_state.items():
        assert state[k].shape == v.shape, k
        err = float((state[k] - v).abs().max())
        assert err <= 1e-5, (name, k, err)
        assert not math.isnan(err)


TWO_RANK = {
    "tp2": ({"tp": 2, "microbatches": 2}, None),
    "pp2 (loop checkpointing)": ({"pp": 2, "microbatches": 2}, {"checkpointing": "loop"}),
    "dp2 zero1": ({"zero": 1, "microbatches": 1}, None),
    "dp2 zero2": ({"zero": 2, "microbatches": 1}, None),
}
FOUR_RANK = {
    "tp2 x pp2": ({"tp": 2, "pp": 2, "microbatches": 2}, None),
    "tp2 x dp2 (zero 1)": ({"tp": 2, "zero": 1, "microbatches": 1}, None),
    # ZeRO-2 under the pipeline (one backward per step), and fewer microbatches than stages
    "pp2 x dp2 (zero 2, M=1)": ({"pp": 2, "zero": 2, "microbatches": 1}, None),
}


def _run(layouts: dict, world: int, reference) -> None:
    with tempfile.TemporaryDirectory() as out:
        per_rank = spawn(_train_layouts, world, list(layouts.values()), out)
    for i, name in enumerate(layouts):
        _check(name, [r[i] for r in per_rank], reference)


def test_two_rank_layouts_match_one_process(reference):
    _run(TWO_RANK, 2, reference)


def test_four_rank_layouts_match_one_process(reference):
    _run(FOUR_RANK, 4, reference)


THREE_STAGES = {"model": {"n_core": 3}, "data": {"batch_size": 12}}


@pytest.mark.slow
def test_three_stage_1f1b_matches_one_process():
    """pp = 3, M = 6: the 1f1b order's steady state (two groups of three microbatches, forwards of
    the second interleaved with backwards of the first), with free iterations and the estimator's
    passes, trains like one process with the same six microbatches."""
    _run({"pp3 M=6 (1f1b)": ({"pp": 3, "microbatches": 6}, None, THREE_STAGES)}, 3, _one_process(6, THREE_STAGES))
