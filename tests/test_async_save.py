"""train.async_save: periodic checkpoints are written on a background thread. The step is not
blocked by the write, a save in flight is never a complete checkpoint (the manifest comes last),
and what is written is the state of the step it was taken at: the same checkpoints and metrics
as the synchronous run."""
from __future__ import annotations

import json
import time

import pytest
import torch

from stars_scale.checkpoint import dcp
from stars_scale.checkpoint.dcp import read_checkpoint
from multirank import fail_saves_of, make_cfg, spawn
from stars_scale import checkpoint as ckpt
from stars_scale.train.trainer import Trainer

TRAIN = {"steps": 6, "ckpt_every": 2, "keep_last": 10, "host_malloc": "system"}


def test_async_save_lets_training_go_on_and_writes_the_same_checkpoints(tmp_path, monkeypatch):
    Trainer(make_cfg({}, TRAIN), tmp_path / "sync").run()

    trainer = Trainer(make_cfg({}, {**TRAIN, "async_save": True}), tmp_path / "async")
    real, seen = dcp.save, {}

    def slow(state, path, group=None):
        if "step_00000002" in str(path):  # hold the first save until training has moved on
            deadline = time.time() + 120
            while trainer.step < 4 and time.time() < deadline:
                time.sleep(0.01)
            seen["step"] = trainer.step
            seen["complete"] = [p.name for p in ckpt.list_checkpoints(tmp_path / "async")]
        real(state, path, group)

    monkeypatch.setattr(dcp, "save", slow)
    trainer.run()
    assert seen == {"step": 4, "complete": []}  # steps 3 and 4 ran during the write; not complete yet
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("sync", "async")}
    assert [(r["step"], r["loss"]) for r in rows["async"]] == [(r["step"], r["loss"]) for r in rows["sync"]]
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "async")]
    assert names == ["step_00000002", "step_00000004", "step_00000006"]
    for name in names:
        ckpt.verify_checkpoint(tmp_path / "async" / "checkpoints" / name)
        a = read_checkpoint(tmp_path / "async" / "checkpoints" / name)[1]
        b = read_checkpoint(tmp_path / "sync" / "checkpoints" / name)[1]
        assert all(torch.equal(a[k], b[k]) for k in b), name  # the state of its step, not a later one


def test_a_failed_async_save_is_reported_at_the_next_interval_and_training_goes_on(tmp_path, monkeypatch, capsys):
    fail_saves_of(monkeypatch, "step_00000002")
    Trainer(make_cfg({}, {**TRAIN, "async_save": True}), tmp_path / "r").run()
    err = capsys.readouterr().err
    assert "step_00000002: checkpoint not written (OSError: [Errno 28] No space left on device" in err
    assert "training continues" in err
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "r")] == ["step_00000004", "step_00000006"]
    assert not list((tmp_path / "r" / "checkpoints").glob(".*"))


def _dp2_zero1(rank: int, world: int, out: str):
    from pathlib import Path

    for name, extra in (("sync", {}), ("async", {"async_save": True})):
        Trainer(make_cfg({"zero": 1, "microbatches": 2}, {**TRAIN, **extra}), Path(out) / name).run()


@pytest.mark.slow
def test_async_save_under_zero1_on_two_ranks_writes_the_same_checkpoints():
    """The ranks' save threads run their collectives on a checkpoint group of their own while the
    training threads go on with theirs."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as out:
        spawn(_dp2_zero1, 2, out)
        for step in (2, 4, 6):
            name = f"step_{step:08d}"
            a = read_checkpoint(Path(out) / "async" / "checkpoints" / name)[1]
            b = read_checkpoint(Path(out) / "sync" / "checkpoints" / name)[1]
            assert all(torch.equal(a[k], b[k]) for k in b), name
        rows = [(Path(out) / n / "metrics.jsonl").read_text() for n in ("sync", "async")]
        assert [json.loads(x)["loss"] for x in rows[0].splitlines()] == \
            [json.loads(x)["loss"] for x in rows[1].splitlines()]
