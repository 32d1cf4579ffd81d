"""Per-rank checkpoints: 3 + 3 steps (stop, resume on the same layout) equal 6 steps, bit for bit.

Two layouts in one 2-rank group: pp2 with zero 0 (our optimizer state files) and dp2 with ZeRO-2
(DeepSpeed's partitioned optimizer state). The consolidated `model.pt` of the last checkpoint
is the single-device model; resuming on another layout is refused with a clear error.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from stars_scale.parallel.testing import make_cfg, spawn

LAYOUTS = [{"pp": 2, "microbatches": 2}, {"zero": 2, "microbatches": 1}]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _resume_worker(rank: int, world: int, out: str):
    from stars_scale.errors import UserError
    from stars_scale.train.trainer import Trainer

    results = []
    for i, parallel in enumerate(LAYOUTS):
        cfg = make_cfg(parallel, {"steps": 6})
        full, split = Path(out) / f"full{i}", Path(out) / f"split{i}"
        Trainer(cfg, full).run()
        first = Trainer(cfg, split, stop_after_steps=3).run()
        assert first["stopped_early"] and first["step"] == 3
        Trainer(cfg, split, resume=True).run()
        other = make_cfg(LAYOUTS[1 - i], {"steps": 6})
        try:
            Trainer(other, split, resume=True)
            refused = None
        except UserError as e:
            refused = str(e)
        results.append(refused)
    return results


def test_resume_on_the_same_layout_reproduces_the_run():
    with tempfile.TemporaryDirectory() as out:
        per_rank = spawn(_resume_worker, 2, out)
        for i in range(len(LAYOUTS)):
            full, split = Path(out) / f"full{i}", Path(out) / f"split{i}"
            a, b = _metrics(full), _metrics(split)
            assert [r["step"] for r in b] == list(range(1, 7))
            for x, y in zip(a, b):
                for key in ("loss", "ce", "penalty", "rho", "depth", "lr", "grad_norm"):
                    assert x[key] == y[key], (LAYOUTS[i], x["step"], key)
            ckpt_a = torch.load(full / "checkpoints" / "step_00000006" / "model.pt")
            ckpt_b = torch.load(split / "checkpoints" / "step_00000006" / "model.pt")
            assert set(ckpt_a) == set(ckpt_b) and "core.1.attn.qkv_proj.weight" in ckpt_a
            for k in ckpt_a:
                assert torch.equal(ckpt_a[k], ckpt_b[k]), (LAYOUTS[i], k)
            state = json.loads((split / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
            assert state["layout"]["pp"] == LAYOUTS[i].get("pp", 1)
            assert sorted(p.name for p in (split / "checkpoints" / "step_00000006").glob("rank_*.pt")) == \
                ["rank_00000.pt", "rank_00001.pt"]
        for refused in per_rank:
            assert all(r is not None and "same parallel" in r for r in refused), refused


def test_consolidated_checkpoint_loads_into_the_plain_model():
    """`model.pt` of a parallel run is what a one-process run would have written."""
    from stars_scale.model.looped import LoopedLM

    with tempfile.TemporaryDirectory() as out:
        spawn(_two_steps_tp2, 2, out)
        sd = torch.load(Path(out) / "run" / "checkpoints" / "step_00000002" / "model.pt")
        model = LoopedLM(make_cfg({}).model)
        model.load_state_dict(sd)  # strict: every name and shape of the single-device model
        assert sd["embed.weight"].shape[0] == 15  # vocabulary padding (15 -> 16 at tp2) removed


def _two_steps_tp2(rank: int, world: int, out: str):
    from stars_scale.train.trainer import Trainer

    Trainer(make_cfg({"tp": 2, "microbatches": 2}, {"steps": 2}), Path(out) / "run").run()
