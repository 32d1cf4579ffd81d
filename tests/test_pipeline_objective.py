"""Under pipeline parallelism the microbatch objective is the one-process objective: the STARS
options that shape the estimate reach every stage's evaluations of the map.

- `stars.probe_precision` (a bf16 step): with `fp32` the core map's evaluations for the `fd`
  estimate run with autocast off, in fp32 (the loop iterations in bf16), with `autocast` every evaluation stays in
  bf16, on every stage as on one process; the fp32 probe's ρ̂ and loss equal one process's.
- `model.kernels`: every kernel call site of a pp2 step (CE, the blocks, the probe's reduction)
  asks with the model's mode, as on one process; `torch` never offers a fused kernel to any.

Spawned gloo ranks on CPU; the one-process reference is the plain `Trainer` with the same two
microbatches. In a bf16 step the stages pass the state on in fp32 while one process keeps it in
bf16 between blocks, so pp2 and one process agree to bf16's resolution, not fp32's (measured:
ρ̂ within 2.2e-3, loss within 4.2e-4 over the three steps with the fp32 probe). With the bf16 probe
the difference quotient magnifies that rounding (4 rows × 16 tokens of unit RMS in width 32: a
state of norm ≈ 45, which 8 bits round by ≈ 2^-9·45 ≈ 0.09, against the step ε = 0.5), so there
ρ̂ is one bf16 estimate of the other's (measured: within 4%, and each 3-7% from its fp32 probe's)
and only the dtypes are compared exactly.
"""
from __future__ import annotations

import tempfile

import pytest
import torch

from multirank import make_cfg, spawn

STEPS = 3
BF16 = {"train": {"dtype": "bf16", "steps": STEPS}}


def _sections(extra: dict) -> dict:
    out = {k: dict(v) for k, v in BF16.items()}
    for k, v in extra.items():
        out.setdefault(k, {}).update(v)
    return out


CASES = {
    "probe fp32": _sections({"stars": {"probe_precision": "fp32"}}),
    "probe autocast": _sections({"stars": {"probe_precision": "autocast"}}),
    "kernels torch": {"model": {"kernels": "torch"}, "train": {"steps": STEPS}},
    "kernels auto": {"model": {"kernels": "auto"}, "train": {"steps": STEPS}},
}


def _recording_modes() -> set:
    """Record the mode every kernel call site asks `kernels.fused` with."""
    from stars_scale import kernels

    asked: set = set()
    real = kernels.fused

    def fused(mode, t):
        asked.add(mode)
        return real(mode, t)

    kernels.fused = fused
    return asked


def _recording_dtypes() -> set:
    """Record the precision every evaluation of the core map (or a stage's part of it) runs in: the
    loop iterations' and the estimate's; "bf16" under the step's autocast, else "fp32"."""
    from stars_scale.model.looped import LoopedLM

    seen: set = set()
    real = LoopedLM.core_step

    def core_step(self, *args, **kwargs):
        seen.add("bf16" if torch.is_autocast_enabled("cpu") else "fp32")
        return real(self, *args, **kwargs)

    LoopedLM.core_step = core_step
    return seen


def _rows(trainer) -> list[dict]:
    return [trainer.train_step() for _ in range(STEPS)]


def _pp2(rank: int, world: int, cases: dict, out: str):
    from stars_scale.train.trainer import Trainer

    asked, dtypes = _recording_modes(), _recording_dtypes()
    got = {}
    for i, (name, sections) in enumerate(cases.items()):
        asked.clear()
        dtypes.clear()
        t = Trainer(make_cfg({"pp": 2, "microbatches": 2}, None, sections), f"{out}/{i}")
        got[name] = {"rows": _rows(t), "asked": set(asked), "dtypes": set(dtypes), "logger": t.reports}
    return got


def _one_process(sections: dict):
    from stars_scale.train.trainer import Trainer

    asked, dtypes = _recording_modes(), _recording_dtypes()
    with tempfile.TemporaryDirectory() as d:
        rows = _rows(Trainer(make_cfg({"microbatches": 2}, None, sections), d))
    return {"rows": rows, "asked": set(asked), "dtypes": set(dtypes)}


@pytest.fixture(scope="module")
def runs():
    from stars_scale import kernels
    from stars_scale.model.looped import LoopedLM

    real, real_step = kernels.fused, LoopedLM.core_step
    torch.set_num_threads(1)
    try:
        one = {name: _one_process(s) for name, s in CASES.items()}
    finally:
        kernels.fused, LoopedLM.core_step = real, real_step
    with tempfile.TemporaryDirectory() as out:
        per_rank = spawn(_pp2, 2, CASES, out)
    last = [r for r in per_rank if next(iter(r.values()))["logger"]]
    assert len(last) == 1
    return one, last[0], per_rank


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def test_probe_precision_reaches_the_pipeline_stages(runs):
    one, pp2, per_rank = runs
    want = {"probe fp32": {"bf16", "fp32"}, "probe autocast": {"bf16"}}
    for name, dtypes in want.items():
        assert one[name]["dtypes"] == dtypes, (name, one[name]["dtypes"])
        for rank, r in enumerate(per_rank):  # each stage holds one core block of the two
            assert r[name]["dtypes"] == dtypes, (name, rank, r[name]["dtypes"])
    for a, b in zip(pp2["probe fp32"]["rows"], one["probe fp32"]["rows"]):
        # bf16 keeps 8 bits (relative rounding 2^-9): a few roundings apart, well within 1e-2
        assert _rel(a["rho"], b["rho"]) <= 1e-2, (a["step"], a["rho"], b["rho"])
        assert _rel(a["loss"], b["loss"]) <= 1e-2, (a["step"], a["loss"], b["loss"])
    for a, b in zip(pp2["probe fp32"]["rows"], pp2["probe autocast"]["rows"]):
        assert a["rho"] != b["rho"], a["step"]  # the stages' evaluations really changed precision


def test_model_kernels_reach_every_call_site_of_the_pipeline(runs):
    one, _, per_rank = runs
    for mode in ("torch", "auto"):
        name = f"kernels {mode}"
        assert one[name]["asked"] == {mode}, one[name]["asked"]
        for rank, r in enumerate(per_rank):
            assert r[name]["asked"] == {mode}, (rank, r[name]["asked"])
