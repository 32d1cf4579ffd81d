"""Distributed checkpoints: 3 + 3 steps (stop, resume on the same layout) equal 6 steps, bit for bit.

Two layouts in one 2-rank group: pp2 with zero 0 (AdamW state per stage) and dp2 with ZeRO-2
(DeepSpeed's flat partitions, saved as logical per-parameter pieces). Every rank writes its own
DCP file; the checkpoint reads back as the single-device model in one process. Resuming on
another layout: tests/test_dcp_reshard.py.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from stars_scale.checkpoint.dcp import read_checkpoint
from multirank import make_cfg, spawn

LAYOUTS = [{"pp": 2, "microbatches": 2}, {"zero": 2, "microbatches": 1}]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _resume_worker(rank: int, world: int, out: str):
    from stars_scale.train.trainer import Trainer

    for i, parallel in enumerate(LAYOUTS):
        cfg = make_cfg(parallel, {"steps": 6})
        full, split = Path(out) / f"full{i}", Path(out) / f"split{i}"
        Trainer(cfg, full).run()
        first = Trainer(cfg, split, stop_after_steps=3).run()
        assert first["stopped_early"] and first["step"] == 3
        Trainer(cfg, split, resume=True).run()


def test_resume_on_the_same_layout_reproduces_the_run():
    with tempfile.TemporaryDirectory() as out:
        spawn(_resume_worker, 2, out)
        for i in range(len(LAYOUTS)):
            full, split = Path(out) / f"full{i}", Path(out) / f"split{i}"
            a, b = _metrics(full), _metrics(split)
            assert [r["step"] for r in b] == list(range(1, 7))
            for x, y in zip(a, b):
                for key in ("loss", "ce", "penalty", "rho", "depth", "lr", "grad_norm"):
                    assert x[key] == y[key], (LAYOUTS[i], x["step"], key)
            ckpt_a = read_checkpoint(full / "checkpoints" / "step_00000006")[1]
            ckpt_b = read_checkpoint(split / "checkpoints" / "step_00000006")[1]
            assert set(ckpt_a) == set(ckpt_b) and "core.1.attn.qkv_proj.weight" in ckpt_a
            for k in ckpt_a:
                assert torch.equal(ckpt_a[k], ckpt_b[k]), (LAYOUTS[i], k)
            state = json.loads((split / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
            assert state["layout"]["pp"] == LAYOUTS[i].get("pp", 1)
            assert sorted(p.name for p in (split / "checkpoints" / "step_00000006").glob("dcp/*.distcp")) == \
                ["__0_0.distcp", "__1_0.distcp"]


def test_a_tp2_checkpoint_reads_as_the_plain_model_in_one_process():
    """What `stars-eval` and `stars-convert export` read: the single-device state dict, no torchrun."""
    from stars_scale.model.looped import LoopedLM

    with tempfile.TemporaryDirectory() as out:
        spawn(_two_steps_tp2, 2, out)
        sd = read_checkpoint(Path(out) / "run" / "checkpoints" / "step_00000002")[1]
        model = LoopedLM(make_cfg({}).model)
        model.load_state_dict(sd)  # strict: every name and shape of the single-device model
        assert sd["embed.weight"].shape[0] == 15  # vocabulary padding (15 -> 16 at tp2) removed


def _two_steps_tp2(rank: int, world: int, out: str):
    from stars_scale.train.trainer import Trainer

    Trainer(make_cfg({"tp": 2, "microbatches": 2}, {"steps": 2}), Path(out) / "run").run()
