"""Non-finite steps: a NaN injected into a gradient (hook) or into the forward (a batch's
embeddings) is skipped before it reaches the weights or a checkpoint; too many in a row roll back
to the last verified checkpoint with a lower learning rate, or stop with one clear line.
Single process, and dp2 / pp2 on gloo."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from stars_scale.errors import UserError
from stars_scale.checkpoint.dcp import read_checkpoint
from multirank import make_cfg, spawn
from stars_scale import checkpoint as ckpt
from stars_scale.train.trainer import Trainer


def _inject(trainer: Trainer, bad_steps: set[int], where: str) -> None:
    """NaN into one parameter's gradient, or into the embedding output, at the (0-based) steps given."""
    model = trainer.model
    if where == "grad":
        p = next(p for p in model.parameters() if p.requires_grad)
        p.register_hook(lambda g: g * float("nan") if trainer.step in bad_steps else g)
    else:
        emb = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
        emb.register_forward_hook(lambda m, i, out: out * float("nan") if trainer.step in bad_steps else out)


def _finite(path: Path) -> bool:
    sd = read_checkpoint(path)[1]
    return all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _params(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("where", ["grad", "batch"])
def test_nonfinite_steps_are_skipped_and_never_reach_the_weights(tmp_path, where):
    cfg = make_cfg({}, {"steps": 6, "ckpt_every": 1, "keep_last": 10, "host_malloc": "system"})
    t = Trainer(cfg, tmp_path / "r")
    _inject(t, {2, 3}, where)
    t.run()
    rows = _rows(tmp_path / "r")
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 2]
    assert all(r["grad_norm"] == r["grad_norm"] for r in rows[:2] + rows[4:])  # finite elsewhere
    for p in ckpt.list_checkpoints(tmp_path / "r"):
        ckpt.verify_checkpoint(p)
        assert _finite(p), p
    # a skipped step leaves the weights exactly as they were
    a = read_checkpoint(tmp_path / "r" / "checkpoints" / "step_00000002")[1]
    b = read_checkpoint(tmp_path / "r" / "checkpoints" / "step_00000004")[1]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_many_skips_stop_with_one_line(tmp_path):
    cfg = make_cfg({}, {"steps": 8, "ckpt_every": 2, "max_skips": 2, "host_malloc": "system"})
    t = Trainer(cfg, tmp_path / "r")
    _inject(t, set(range(3, 100)), "grad")
    with pytest.raises(UserError, match=r"3 non-finite steps in a row \(train.max_skips=2\); stopped"):
        t.run()
    assert all(_finite(p) for p in ckpt.list_checkpoints(tmp_path / "r"))


def test_stop_policy_stops_at_the_first(tmp_path):
    cfg = make_cfg({}, {"steps": 5, "nonfinite": "stop", "host_malloc": "system"})
    t = Trainer(cfg, tmp_path / "r")
    _inject(t, {1}, "batch")
    with pytest.raises(UserError, match=r"step 2: loss nan, .* not finite; stopped \(train.nonfinite: stop\)"):
        t.run()


def test_rollback_reloads_the_last_checkpoint_with_a_lower_lr(tmp_path, capsys):
    cfg = make_cfg({}, {"steps": 8, "ckpt_every": 2, "max_skips": 1, "nonfinite": "rollback",
                        "rollback_lr_scale": 0.25, "host_malloc": "system"})
    t = Trainer(cfg, tmp_path / "r")
    lr_before = t.engine.lr
    hits = {"n": 0}
    p = next(p for p in t.model.parameters() if p.requires_grad)

    def hook(g):  # steps 5 and 6 (0-based 4, 5) blow up once: the second time through they pass
        if t.step in (4, 5) and hits["n"] < 2:
            hits["n"] += 1
            return g * float("inf")
        return g

    p.register_hook(hook)
    t.run()
    err = capsys.readouterr().err
    assert "rolling back to step_00000004 with the learning rate scaled by 0.25" in err
    steps = [r["step"] for r in _rows(tmp_path / "r")]
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # 5 and 6 skipped, rolled back to 4, trained again
    state = ckpt.load_state(tmp_path / "r" / "checkpoints" / "step_00000008")
    assert state["scheduler"]["base_lrs"] == [pytest.approx(lr_before * 0.25)] * len(state["scheduler"]["base_lrs"])
    assert all(_finite(q) for q in ckpt.list_checkpoints(tmp_path / "r"))


def _parallel_worker(rank: int, world: int, out: str, parallel: dict):
    cfg = make_cfg(parallel, {"steps": 5, "ckpt_every": 1, "keep_last": 10})
    t = Trainer(cfg, Path(out) / "r")
    params = [p for p in t.model.parameters() if p.requires_grad]
    if rank == world - 1:  # NaN on one rank only: the global norm makes every rank skip
        params[-1].register_hook(lambda g: g * float("nan") if t.step == 2 else g)
    t.run()


@pytest.mark.parametrize("parallel", [{"microbatches": 2}, {"pp": 2, "microbatches": 2}, {"zero": 1, "microbatches": 2},
                                      {"zero": 2, "microbatches": 1}], ids=["dp2", "pp2", "dp2-zero1", "dp2-zero2"])
def test_a_nan_on_one_rank_is_skipped_on_every_rank(parallel):
    with tempfile.TemporaryDirectory() as out:
        spawn(_parallel_worker, 2, out, parallel)
        run = Path(out) / "r"
        rows = _rows(run)
        assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
        for p in ckpt.list_checkpoints(run):
            ckpt.verify_checkpoint(p)
            assert _finite(p), p
        a = read_checkpoint(run / "checkpoints" / "step_00000002")[1]
        b = read_checkpoint(run / "checkpoints" / "step_00000003")[1]
        assert all(torch.equal(a[k], b[k]) for k in a)  # the skipped step changed nothing, on any stage
