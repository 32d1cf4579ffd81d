"""The planner agrees with the code: per-rank parameters + optimizer state + activations of real
layouts (spawned gloo ranks on CPU, as torchrun runs them) against `stars-plan`'s figure for
that rank's stage, within 10%.

Measured: parameter bytes of the rank's model part and its optimizer state after a step (our
AdamW's moments, or DeepSpeed's fp32 master partition and moments), and the most bytes autograd
held for backward at once (`Engine.measure`: a saved-tensors hook, unique storages, parameters
excluded). No STARS estimator in the step (the planner does not model the probe's passes).
"""
from __future__ import annotations

import tempfile

import pytest

from multirank import make_cfg, spawn

LAYOUTS = {
    "tp2": {"tp": 2, "microbatches": 2},
    "pp2 M=4": {"pp": 2, "microbatches": 4},
    "dp2 zero1": {"zero": 1, "microbatches": 1},
    "dp2 zero2": {"zero": 2, "microbatches": 1},
}


def _cfg(parallel: dict):
    cfg = make_cfg(parallel, {"steps": 1})
    cfg.stars.lam, cfg.stars.estimate_every = 0.0, 0
    cfg.depth.dist, cfg.depth.value = "fixed", 3
    cfg.data.batch_size = 16
    return cfg


def _measure(rank: int, world: int, layouts: list, out: str):
    from stars_scale.train.trainer import Trainer

    got = []
    for i, parallel in enumerate(layouts):
        t = Trainer(_cfg(parallel), f"{out}/l{i}")
        t.engine.measure = True
        t.train_step()
        b = t.engine.opt.state_bytes()
        batch = t.source.next_batch()["input_ids"]
        got.append({"stage": t.engine.ps.pp_rank, "params": b["params"], "optim": b["optimizer"],
                    "act": t.engine.peak_saved_bytes, "seq": batch.shape[1]})
    return got


@pytest.fixture(scope="module")
def measured():
    with tempfile.TemporaryDirectory() as out:
        per_rank = spawn(_measure, 2, list(LAYOUTS.values()), out)
    return {name: [r[i] for r in per_rank] for i, name in enumerate(LAYOUTS)}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planner_matches_measured_memory_per_rank(measured, name):
    from stars_scale.plan import plan

    cfg = _cfg(LAYOUTS[name])
    p = cfg.parallel
    ranks = measured[name]
    rows = cfg.data.batch_size // ((2 // (p.tp * p.pp)) * p.microbatches)
    lp = plan(cfg, nodes=1, gpus_per_node=2, batch=rows, seq=ranks[0]["seq"], draws=10).config_layout()
    assert lp is not None and lp.valid, lp
    for r in ranks:
        st = lp.stages[r["stage"]]
        planned = {"params": st.state.weights, "optim": st.state.optim, "act": st.activations}
        got = {k: r[k] for k in planned}
        assert got["act"] > 0 and got["optim"] > 0
        ratio = sum(got.values()) / sum(planned.values())
        assert 0.9 <= ratio <= 1.1, (name, r["stage"], got, planned)
        assert got["params"] == pytest.approx(planned["params"], rel=0.01), (name, got, planned)
