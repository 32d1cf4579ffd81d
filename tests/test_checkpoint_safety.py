"""Checkpoints that cannot run code, are verified on load, survive crashes and failed saves.

Training runs in-process through the CLI's `main` (what `stars-train` runs) on a tiny model;
a few cases go through a subprocess where the process boundary matters (a file-size limit,
a pickle payload that would write a file if it ran).
"""
from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stars_scale.cli import eval as eval_cli
from stars_scale.cli import train as train_cli
from stars_scale import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "seed": 0,
    "model": {"vocab_size": 15, "hidden": 32, "heads": 2, "max_seq_len": 16, "mlp_hidden": 64},
    "depth": {"dist": "fixed", "value": 2},
    "data": {"digits": 3, "batch_size": 8, "test_size": 16},
    "optim": {"lr": 0.003},
    "train": {"steps": 4, "ckpt_every": 1, "keep_last": 3, "progress": False, "host_malloc": "system"},
    "eval": {"samples": 16},
    "tracking": {"mlflow": False},
}


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def train(cfg_file: Path, out: Path, *extra: str) -> int:
    return train_cli.main(["--config", str(cfg_file), "--out", str(out), *extra])


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def flip_bit(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


def make_legacy(ckpt_dir: Path) -> None:
    """What a checkpoint written before manifests looks like: no manifest.json, no format marker."""
    (ckpt_dir / "manifest.json").unlink()
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    state.pop("checkpoint_format")
    (ckpt_dir / "trainer_state.json").write_text(json.dumps(state))


def to_per_rank_format(ck: Path) -> None:
    """Rewrite a one-process checkpoint in the format of the versions before DCP (`model.pt` +
    `rank_00000.pt`, manifest included): what an older run directory holds."""
    from stars_scale.config import load_config
    from stars_scale.model.looped import LoopedLM
    from stars_scale.parallel.engine import Engine

    cfg = load_config(ck / "config.yaml")
    engine = Engine(cfg)
    engine.parallelize(LoopedLM(cfg.model))
    engine.build_optimizer()
    state = ckpt.load_state(ck)
    extras = engine.load_shards(ck, state["scheduler"])
    ckpt.save_tensor_file(engine.model.state_dict(), ck / "model.pt")
    ckpt.save_tensor_file({"rng": extras["rng"], "data": extras["data"], "layout": engine.layout(),
                           "engine": engine.opt.state_dict()}, ck / "rank_00000.pt")
    shutil.rmtree(ck / "dcp")
    shutil.rmtree(ck / "ranks")
    ckpt.write_manifest(ck, state["step"])


class Payload:
    """Unpickling this runs `open(marker, 'w')`: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_has_a_manifest_and_verifies(tmp_path, cfg_file):
    assert train(cfg_file, tmp_path / "r") == 0
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "r")]
    assert names == ["step_00000002", "step_00000003", "step_00000004"]  # keep_last 3, pruned in order
    last = tmp_path / "r" / "checkpoints" / "step_00000004"
    manifest = json.loads((last / "manifest.json").read_text())
    assert set(manifest["files"]) == {"dcp/.metadata", "dcp/__0_0.distcp", "ranks/rank_00000.json", "config.yaml",
                                      "trainer_state.json"}
    ckpt.verify_checkpoint(last)
    assert not [p for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_pickle_payload_is_refused_not_run(tmp_path, cfg_file, capsys):
    assert train(cfg_file, tmp_path / "r", "--set", "train.steps=1") == 0
    last = tmp_path / "r" / "checkpoints" / "step_00000001"
    marker = tmp_path / "PWNED"
    metadata = last / "dcp" / ".metadata"
    good = metadata.read_bytes()
    metadata.write_bytes(pickle.dumps(Payload(str(marker))))
    # with the manifest: refused before unpickling (sha256 differs)
    assert eval_cli.main(["depth", "--checkpoint", str(last), "--depths", "1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert ".metadata: " in line and "the manifest says" in line
    # a manifest rewritten to match (a hostile checkpoint): DCP's pickled metadata goes through
    # the restricted unpickler, which refuses the payload
    ckpt.write_manifest(last, 1)
    assert eval_cli.main(["depth", "--checkpoint", str(last), "--depths", "1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert ".metadata: refused" in line and "is not a checkpoint metadata class" in line
    assert train(cfg_file, tmp_path / "r", "--resume", "--set", "train.steps=2") == 2
    assert ".metadata: refused" in one_error_line(capsys.readouterr().err)
    assert not marker.exists()
    metadata.write_bytes(good)
    ckpt.write_manifest(last, 1)
    # a lost manifest is noticed
    (last / "manifest.json").unlink()
    assert eval_cli.main(["depth", "--checkpoint", str(last), "--depths", "1"]) == 2
    assert "manifest.json: missing" in one_error_line(capsys.readouterr().err)
    # the per-rank format of older versions without a manifest: the restricted unpickler refuses the payload
    (last / "manifest.json").write_text("{}")
    ckpt.write_manifest(last, 1)
    to_per_rank_format(last)
    torch.save({"w": Payload(str(marker))}, last / "model.pt")
    make_legacy(last)
    with pytest.raises(ckpt.CheckpointError, match="refused: it holds Python objects"):
        ckpt.load_tensor_file(last / "model.pt")
    assert eval_cli.main(["depth", "--checkpoint", str(last), "--depths", "1"]) == 2
    assert "refused" in one_error_line(capsys.readouterr().err)
    assert not marker.exists()


def test_payload_in_a_subprocess_eval_never_runs(tmp_path, cfg_file):
    assert train(cfg_file, tmp_path / "r", "--set", "train.steps=1") == 0
    last = tmp_path / "r" / "checkpoints" / "step_00000001"
    marker = tmp_path / "PWNED"
    to_per_rank_format(last)
    with open(last / "model.pt", "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    make_legacy(last)
    res = subprocess.run([sys.executable, "-m", "stars_scale.cli.eval", "depth", "--checkpoint", str(last),
                          "--depths", "1"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 2 and not marker.exists()
    one_error_line(res.stderr)


@pytest.mark.parametrize("victim", ["dcp/__0_0.distcp", "dcp/.metadata", "ranks/rank_00000.json",
                                    "trainer_state.json", "config.yaml"])
def test_corrupt_newest_checkpoint_falls_back_and_says_so(tmp_path, cfg_file, capsys, victim):
    out = tmp_path / "r"
    assert train(cfg_file, out, "--stop-after-steps", "3") == 0
    flip_bit(out / "checkpoints" / "step_00000003" / victim)
    capsys.readouterr()
    assert train(cfg_file, out, "--resume") == 0
    err = capsys.readouterr().err
    assert f"step_00000003/{victim}" in err and "resuming from" in err and "step_00000002" in err
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]  # step 3 retrained, logged once
    ckpt.verify_checkpoint(out / "checkpoints" / "step_00000004")


def test_explicit_corrupt_checkpoint_is_one_line(tmp_path, cfg_file, capsys):
    out = tmp_path / "r"
    assert train(cfg_file, out, "--set", "train.steps=2") == 0
    last = out / "checkpoints" / "step_00000002"
    flip_bit(last / "dcp" / "__0_0.distcp", offset=-3)
    capsys.readouterr()
    assert train(cfg_file, tmp_path / "r2", "--resume", str(last)) == 2
    assert "sha256 differs" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r2").exists()  # nothing written for a refused resume


def test_exponent_flip_in_weights_is_caught_before_training(tmp_path, cfg_file, capsys):
    out = tmp_path / "r"
    assert train(cfg_file, out, "--set", "train.steps=2", "--set", "train.keep_last=1") == 0
    model = out / "checkpoints" / "step_00000002" / "dcp" / "__0_0.distcp"
    data = bytearray(model.read_bytes())
    data[-200] ^= 0x40  # inside the last tensor's float32 bytes
    model.write_bytes(bytes(data))
    capsys.readouterr()
    assert train(cfg_file, out, "--resume", "--set", "train.steps=4") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no checkpoint verifies" in line and "step_00000002" in line


@pytest.mark.parametrize("state", ["{}", "[]", '{"step": -1, "scheduler": {}, "data": {}}', "not json",
                                   '{"step": "1"}'])
def test_bad_trainer_state_of_a_legacy_checkpoint_is_one_line(tmp_path, cfg_file, capsys, state):
    out = tmp_path / "r"
    assert train(cfg_file, out, "--set", "train.steps=1") == 0
    last = out / "checkpoints" / "step_00000001"
    to_per_rank_format(last)
    (last / "manifest.json").unlink()  # a checkpoint written before manifests: only the state check guards it
    (last / "trainer_state.json").write_text(state)
    capsys.readouterr()
    assert train(cfg_file, tmp_path / "r2", "--resume", str(last)) == 2
    assert "trainer_state.json" in one_error_line(capsys.readouterr().err)


def test_legacy_checkpoint_without_manifest_still_resumes(tmp_path, cfg_file):
    out = tmp_path / "r"
    assert train(cfg_file, out, "--stop-after-steps", "2") == 0
    for p in (out / "checkpoints").glob("step_*/manifest.json"):
        to_per_rank_format(p.parent)
        make_legacy(p.parent)
    assert train(cfg_file, out, "--resume") == 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]


def test_per_rank_format_resumes_on_its_layout_and_is_refused_on_another(tmp_path, cfg_file, capsys):
    out = tmp_path / "r"
    assert train(cfg_file, out, "--stop-after-steps", "2") == 0
    for p in ckpt.list_checkpoints(out):
        to_per_rank_format(p)
    capsys.readouterr()
    assert train(cfg_file, out, "--resume", "--set", "parallel.microbatches=2") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "per-rank format of older versions" in line and "'microbatches': 1" in line
    assert train(cfg_file, out, "--resume") == 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]


def test_crash_leftovers_are_cleaned_and_never_resumed(tmp_path, cfg_file):
    out = tmp_path / "r"
    assert train(cfg_file, out, "--stop-after-steps", "2") == 0
    root = out / "checkpoints"
    # a kill while an old (legacy-format) checkpoint was being deleted by an older version:
    # state file left, weights gone; and temporaries of a kill mid-save / mid-prune
    half = root / "step_00000003"
    half.mkdir()
    (half / "trainer_state.json").write_text((root / "step_00000002" / "trainer_state.json").read_text())
    for stale in (".step_00000005.tmp", ".step_00000001.deleting", ".step_00000002.old"):
        (root / stale).mkdir()
        (root / stale / "model.pt").write_bytes(b"x" * 100)
    (root / ".latest.abc123.tmp").write_text("step")
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000001", "step_00000002"]
    # a torn last line of metrics.jsonl (killed mid-write)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert train(cfg_file, out, "--resume") == 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    assert not [p for p in root.iterdir() if p.name.startswith(".step") or p.name.startswith(".latest")]


def test_fresh_start_sets_aside_metrics_of_a_run_that_never_checkpointed(tmp_path, cfg_file, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)))
    assert train(cfg_file, out) == 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    aside = list(out.glob("metrics.before-*.jsonl"))
    assert len(aside) == 1 and len(aside[0].read_text().splitlines()) == 2  # the dead run's lines are kept


def test_kill_while_pruning_leaves_only_complete_checkpoints(tmp_path, cfg_file, monkeypatch):
    out = tmp_path / "r"
    assert train(cfg_file, out, "--stop-after-steps", "3") == 0

    def killed_midway(path, *a, **k):
        (Path(path) / "dcp" / ".metadata").unlink()  # half deleted, then the "kill"
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)  # the one shutil module the checkpoint code uses
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(out, keep_last=1, up_to_step=3)
    monkeypatch.undo()
    names = [p.name for p in ckpt.list_checkpoints(out)]
    assert "step_00000001" not in names and names[-1] == "step_00000003"
    assert ckpt.latest_checkpoint(out).name == "step_00000003"


def test_a_failed_save_warns_and_the_next_interval_retries(tmp_path, cfg_file, monkeypatch, capsys):
    from multirank import fail_saves_of

    fail_saves_of(monkeypatch, "step_00000002")
    out = tmp_path / "r"
    assert train(cfg_file, out) == 0
    err = capsys.readouterr().err
    assert "step_00000002: checkpoint not written (OSError: [Errno 28] No space left on device" in err
    assert "training continues" in err and "the last checkpoint took" in err and "bytes are free" in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000001", "step_00000003", "step_00000004"]
    assert not list((out / "checkpoints").glob(".*"))
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]


def test_saves_failing_in_a_row_stop_with_one_line(tmp_path, cfg_file, monkeypatch, capsys):
    from stars_scale.checkpoint import dcp

    real = dcp.save

    def full_after_first(state, path, group=None):
        if "step_00000001" not in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 320 vs 246")
        real(state, path, group)

    monkeypatch.setattr(dcp, "save", full_after_first)
    out = tmp_path / "r"
    assert train(cfg_file, out, "--set", "train.steps=10", "--set", "train.max_failed_saves=2") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "2 checkpoint saves in a row failed" in line and "step_00000003" in line
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000001"]
    ckpt.verify_checkpoint(out / "checkpoints" / "step_00000001")
    assert not list((out / "checkpoints").glob(".*"))


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_file_size_limit_gives_one_line_and_keeps_the_previous_checkpoint(tmp_path, cfg_file):
    """A real I/O failure (EFBIG from RLIMIT_FSIZE) in a real process, no monkeypatching."""
    out = tmp_path / "r"
    assert train(cfg_file, out, "--set", "train.steps=1") == 0
    limit = (out / "checkpoints" / "step_00000001" / "dcp" / "__0_0.distcp").stat().st_size // 2  # won't fit
    res = subprocess.run([sys.executable, "-m", "stars_scale.cli.train", "--config", str(cfg_file), "--out", str(out),
                          "--resume", "--set", "train.steps=3", "--set", "train.max_failed_saves=5"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         preexec_fn=_limit_file_size(limit))
    assert res.returncode == 2, res.stderr
    line = one_error_line(res.stderr)
    assert "final checkpoint was not saved" in line and "File too large; writing dcp/__0_0.distcp needs about" in line
    assert "step_00000002: checkpoint not written" in res.stderr  # the periodic one warned, training went on
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000001"]
    ckpt.verify_checkpoint(out / "checkpoints" / "step_00000001")
    assert not list((out / "checkpoints").glob(".*"))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (the RLIMIT_FSIZE test covers this)")
def test_disk_full_on_a_small_tmpfs(tmp_path, cfg_file):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("mount -t tmpfs failed (no CAP_SYS_ADMIN in this container)")
    try:
        cfg = yaml.safe_load(cfg_file.read_text())
        cfg["model"]["hidden"] = 64  # ~0.5 MB per checkpoint: the fourth does not fit in 2 MiB
        cfg["train"].update(steps=6, keep_last=10, max_failed_saves=2)
        cfg_file.write_text(yaml.safe_dump(cfg))
        res = subprocess.run([sys.executable, "-m", "stars_scale.cli.train", "--config", str(cfg_file),
                              "--out", str(mnt / "r")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert res.returncode == 2, res.stderr
        line = one_error_line(res.stderr)
        assert "checkpoint not written" in line and "No space left on device" in line
        kept = ckpt.list_checkpoints(mnt / "r")
        assert kept and all(ckpt.verify_checkpoint(p) is None for p in kept)
        assert not list((mnt / "r" / "checkpoints").glob(".*"))  # the half-written temporary is gone
    finally:
        subprocess.run(["umount", str(mnt)])


class Opaque:
    """An arbitrary object pickled into a tensor file (a pickled model class, an optimizer...)."""


@pytest.mark.parametrize("write,named", [
    (lambda p, m: torch.save({"w": torch.zeros(2), "obj": Opaque()}, p), f"{__name__}.Opaque"),
    (lambda p, m: torch.save({"w": Payload(m)}, p, _use_new_zipfile_serialization=False), "io.open"),
    (lambda p, m: p.write_bytes(pickle.dumps({"w": Payload(m)}, protocol=4)), "io.open"),
], ids=["torch.save-object", "legacy-format-payload", "plain-pickle-payload"])
def test_refused_tensor_file_names_the_object_it_refused(tmp_path, write, named):
    path, marker = tmp_path / "model.pt", tmp_path / "marker"
    write(path, str(marker))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_tensor_file(path)
    msg = str(e.value)
    assert "refused: it holds Python objects" in msg and msg.endswith(f"(refused: {named})"), msg
    assert not marker.exists()


def test_refusal_names_the_object_whatever_torch_says(tmp_path, monkeypatch):
    """torch's wording differs by version (2.11's message has no 'Unsupported' line, which left an
    empty '()'): the name comes from the file itself, read without unpickling."""
    path, marker = tmp_path / "model.pt", tmp_path / "marker"
    torch.save({"w": Payload(str(marker))}, path)

    def load(*a, **k):
        raise pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` set to "
                                     "`False` will likely succeed.\nWeightsUnpickler error: \n\nsomething else")

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(ckpt.CheckpointError, match=r"which could run code on load \(refused: io\.open\)$"):
        ckpt.load_tensor_file(path)
    assert not marker.exists()
