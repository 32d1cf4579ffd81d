"""Distributed checkpoints (DCP, logical names) resume on another layout.

Each layout A trains 3 steps and checkpoints; the run resumes to step 6 on A (the reference) and,
from a copy of the same checkpoint, on layout B. The steps after the resume must give the same
losses within 1e-5: tp2 -> 1 process, pp2 -> 1 process, tp2 x pp2 -> 1 process, dp2 (zero 1) ->
dp4 (zero 2), and 1 process -> tp2 x pp2. Layouts A and B keep dp x microbatches equal (the
microbatches seed the STARS estimator), so the same-layout resume is the reference for both.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from stars_scale.checkpoint.dcp import ShardSpec, flat_boxes, to_logical
from multirank import make_cfg, spawn

STEPS, FIRST = 6, 3
TP2, PP2, TP2PP2 = {"tp": 2, "microbatches": 2}, {"pp": 2, "microbatches": 2}, {"tp": 2, "pp": 2, "microbatches": 2}
DP2_ZERO1, DP4_ZERO2 = {"zero": 1, "microbatches": 2}, {"zero": 2, "microbatches": 1}
ONE = {"microbatches": 2}


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _first_and_reference(out: Path, name: str, parallel: dict) -> None:
    """Layout A: 3 steps and a checkpoint (copied to NAME.copy for layout B), then resumed to 6."""
    from stars_scale.train.trainer import Trainer

    cfg = make_cfg(parallel, {"steps": STEPS})
    run = out / name
    Trainer(cfg, run, stop_after_steps=FIRST).run()
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.copytree(run, out / f"{name}.copy")
    if dist.is_initialized():
        dist.barrier()
    Trainer(cfg, run, resume=True).run()


def _resume(out: Path, name: str, parallel: dict) -> None:
    from stars_scale.train.trainer import Trainer

    Trainer(make_cfg(parallel, {"steps": STEPS}), out / f"{name}.copy", resume=True).run()


def _world2(rank: int, world: int, out: str):
    for name, layout in (("tp2", TP2), ("pp2", PP2), ("dp2z1", DP2_ZERO1)):
        _first_and_reference(Path(out), name, layout)


def _world4(rank: int, world: int, out: str):
    _first_and_reference(Path(out), "tp2pp2", TP2PP2)
    _resume(Path(out), "dp2z1", DP4_ZERO2)
    _resume(Path(out), "one", TP2PP2)


def _compare(out: Path, name: str) -> None:
    ref, got = _losses(out / name), _losses(out / f"{name}.copy")
    assert sorted(got) == list(range(1, STEPS + 1)), name
    for step in range(FIRST + 1, STEPS + 1):
        assert math.isfinite(got[step]) and abs(got[step] - ref[step]) <= 1e-5, (name, step, got[step], ref[step])


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_layout():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _first_and_reference(out, "one", ONE)  # this process: one process, no torchrun
        spawn(_world2, 2, str(out))
        spawn(_world4, 4, str(out))
        for name in ("tp2", "pp2", "tp2pp2"):
            _resume(out, name, ONE)
        for name in ("tp2", "pp2", "tp2pp2", "dp2z1", "one"):
            _compare(out, name)
        # every rank wrote its own DCP file; the single-device model reads back in one process
        ck = out / "tp2pp2" / "checkpoints" / "step_00000006"
        assert sorted(p.name for p in (ck / "dcp").glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
        assert not (ck / "model.pt").exists()
        from stars_scale.model.looped import LoopedLM
        from stars_scale.checkpoint.dcp import read_checkpoint

        run, sd = read_checkpoint(ck)
        LoopedLM(run.model).load_state_dict(sd)  # strict: every name and shape of the plain model
        assert sd["embed.weight"].shape[0] == 15  # tp2's vocabulary padding (16) is not logical


def test_flat_ranges_are_split_into_boxes_that_cover_them_in_order():
    shape = (3, 4, 5)
    for start, stop in [(0, 60), (7, 8), (3, 47), (20, 40), (19, 41), (0, 1), (59, 60)]:
        seen = []
        for off, size in flat_boxes(shape, start, stop):
            idx = torch.arange(60).view(shape)[tuple(slice(o, o + s) for o, s in zip(off, size))].reshape(-1)
            assert torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + idx.numel()))  # contiguous
            seen += idx.tolist()
        assert seen == list(range(start, stop)), (start, stop)
    assert len(flat_boxes((4, 8), 5, 29)) == 3  # part of a row, whole rows, part of a row


def test_strided_and_padded_shards_map_to_their_logical_rows():
    full = torch.arange(16 * 2).view(16, 2)
    # stride 2 over tp 2 (cat(gate, up)): rank 1 holds gate rows 4..8 and up rows 12..16
    local = torch.cat([full[4:8], full[12:16]])
    pieces = to_logical((0, 0), (8, 2), local, (8, 2), ShardSpec((16, 2), dim=0, stride=2, tp=2, tp_rank=1))
    assert [(o, s) for o, s, _ in pieces] == [((4, 0), (4, 2)), ((12, 0), (4, 2))]
    for o, s, v in pieces:
        assert torch.equal(v, full[o[0]:o[0] + s[0]])
    # vocabulary 15 padded to 16 over tp 2: rank 1's last row is padding
    pieces = to_logical((0, 0), (8, 2), full[8:16], (8, 2), ShardSpec((15, 2), dim=0, tp=2, tp_rank=1))
    assert [(o, s) for o, s, _ in pieces] == [((8, 0), (7, 2))]
