"""The run directory is the project's own, and every reader of a checkpoint verifies it (issue 26).

Each case here failed on the code before it (6b0f871): a user's config.yaml replaced, a resume
of another run accepted, tracebacks for an --out that cannot be a run directory, a checkpoint
without its manifest skipped and later overwritten, unlisted files (a distcp, a tokenizer.json)
used, trainer-state fields of impossible values crashing the run, a full disk while appending
metrics.jsonl killing the run without a checkpoint, the MLflow warning on two lines.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from cli_cases import BASE, _yaml_text, assert_one_line_exit2, run_main, workdir  # noqa: F401 (a fixture)

from stars_scale.cli import eval as eval_cli
from stars_scale.cli import generate as generate_cli
from stars_scale.cli import train as train_cli


def _config(path: Path, **sections) -> Path:
    tree = json.loads(json.dumps(BASE))
    for key, value in sections.items():
        if isinstance(value, dict):
            tree[key] = {**tree.get(key, {}), **value}
        else:
            tree[key] = value
    path.write_bytes(_yaml_text(tree))
    return path


def _train(cfg: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_main(train_cli.main, ["--config", str(cfg), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run of 2 steps with a checkpoint at each step (step_00000001, step_00000002)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = _config(root / "run.yaml", train={"steps": 2, "ckpt_every": 1, "keep_last": 3})
    rc, err = _train(cfg, root / "run")
    assert rc == 0, err
    return root


def _copy_run(trained: Path, to: Path) -> Path:
    shutil.copytree(trained / "run", to / "run")
    shutil.copy(trained / "run.yaml", to / "run.yaml")
    return to / "run"


def _rewrite_manifest(ckpt: Path) -> None:
    """Re-list every file of `ckpt` in its manifest (what an attacker who edits a state file can do)."""
    m = json.loads((ckpt / "manifest.json").read_text())
    for rel in m["files"]:
        data = (ckpt / rel).read_bytes()
        m["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    m["step"] = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    (ckpt / "manifest.json").write_text(json.dumps(m))


# --------------------------------------------------------------------------- user files are never lost


def test_a_users_config_in_out_is_never_replaced(workdir):
    d = workdir / "exp"
    d.mkdir()
    text = b"# my experiment, keep these notes\n" + _yaml_text(BASE)
    (d / "config.yaml").write_bytes(text)
    rc, err = _train(d / "config.yaml", d)
    assert_one_line_exit2(rc, err, "config in out")
    assert "did not write" in err and "config.yaml" in err
    assert (d / "config.yaml").read_bytes() == text
    assert not (d / "checkpoints").exists()


def test_the_projects_own_config_is_rewritten_on_a_rerun(workdir):
    cfg = _config(workdir / "c.yaml")
    assert _train(cfg, workdir / "r")[0] == 0
    assert (workdir / "r" / "config.yaml").read_text().startswith("# stars_scale: the resolved config")
    rc, err = _train(cfg, workdir / "r", "--resume", "--set", "train.steps=2")  # more steps: same run
    assert rc == 0, err
    from stars_scale.config import load_config
    assert load_config(workdir / "r" / "config.yaml").train.steps == 2


@pytest.mark.parametrize("resume", [["--resume"], ["--resume", "auto"], ["--resume", "RUN"]])
@pytest.mark.parametrize("change", [{"seed": 1}, {"optim": {"lr": 0.02}}, {"data": {"digits": 2}}])
def test_resume_of_another_run_is_refused(trained, tmp_path, resume, change):
    run = _copy_run(trained, tmp_path)
    before = (run / "config.yaml").read_bytes()
    other = _config(tmp_path / "other.yaml", **change, train={"steps": 3})
    rc, err = _train(other, run, *[str(run) if a == "RUN" else a for a in resume])
    assert_one_line_exit2(rc, err, (resume, change))
    assert "another run" in err and next(iter(change)) in err and "--allow-config-change" in err
    assert (run / "config.yaml").read_bytes() == before
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]


def test_allow_config_change_continues_the_run(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    other = _config(tmp_path / "other.yaml", optim={"lr": 0.02}, train={"steps": 3})
    rc, err = _train(other, run, "--resume", "--allow-config-change")
    assert rc == 0, err
    assert (run / "checkpoints" / "step_00000003").is_dir()


@pytest.mark.parametrize("kind", ["file", "under_a_file", "unwritable", "config_is_a_dir"])
def test_an_out_that_cannot_be_a_run_directory_is_one_line(workdir, kind):
    cfg = _config(workdir / "c.yaml")
    out = workdir / "o"
    if kind == "file":
        out.write_text("not a directory")
    elif kind == "under_a_file":
        (workdir / "f").write_text("x")
        out = workdir / "f" / "run"
    elif kind == "unwritable":
        out = Path("/proc/stars_scale_run")  # not writable even by root
    else:
        (out / "config.yaml").mkdir(parents=True)
    rc, err = _train(cfg, out)
    assert_one_line_exit2(rc, err, kind)
    assert str(out) in err
    if kind == "file":
        assert out.read_text() == "not a directory"


# --------------------------------------------------------------------------- integrity


def _assert_refused(rc: int, err: str, case) -> None:
    """Exit 2, no traceback, the last line an error; the lines before it each name a checkpoint
    refused on the way (a run directory falls back to its older checkpoints)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err, (case, rc, err[-2000:])
    assert lines[-1].startswith("error: ") and all(ln.startswith("warning: ") for ln in lines[:-1]), (case, err)


def test_a_checkpoint_without_its_manifest_is_refused_not_skipped(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    ckpt = run / "checkpoints" / "step_00000002"
    (ckpt / "manifest.json").unlink()
    rc, err = _train(tmp_path / "run.yaml", run)  # a fresh start must not overwrite it
    assert_one_line_exit2(rc, err, "fresh start")
    assert "already holds checkpoints" in err
    for main, argv in [(train_cli.main, ["--config", str(tmp_path / "run.yaml"), "--out", str(run), "--resume",
                                         str(ckpt)]),
                       (eval_cli.main, ["depth", "--checkpoint", str(ckpt), "--depths", "1"]),
                       (generate_cli.main, ["--checkpoint", str(ckpt), "--prompt", "1+2=", "--depth", "1"])]:
        rc, err = run_main(main, argv)
        assert_one_line_exit2(rc, err, argv[:2])
        assert "step_00000002/manifest.json: missing" in err
    (run / "checkpoints" / "step_00000001" / "manifest.json").unlink()
    for main, argv in [(train_cli.main, ["--config", str(tmp_path / "run.yaml"), "--out", str(run), "--resume"]),
                       (eval_cli.main, ["depth", "--checkpoint", str(run), "--depths", "1"])]:
        rc, err = run_main(main, argv)
        _assert_refused(rc, err, argv[:2])
        assert "step_00000001/manifest.json: missing" in err and "step_00000002/manifest.json: missing" in err
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]


def test_a_checkpoint_without_its_manifest_is_named_when_an_older_one_is_used(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    (run / "checkpoints" / "step_00000002" / "manifest.json").unlink()
    rc, err = _train(tmp_path / "run.yaml", run, "--resume", "--set", "train.steps=3")
    assert rc == 0, err
    assert "step_00000002/manifest.json: missing" in err
    assert "resuming from" in err and "step_00000001" in err


@pytest.mark.parametrize("name", ["dcp/__1_0.distcp", "tokenizer.json", "model.safetensors", "notes.txt"])
def test_an_unlisted_file_in_a_checkpoint_is_refused_by_every_reader(trained, tmp_path, name):
    run = _copy_run(trained, tmp_path)
    ckpt = run / "checkpoints" / "step_00000002"
    data = bytearray((ckpt / "dcp" / "__0_0.distcp").read_bytes()) if name.endswith(".distcp") \
        else bytearray(b'{"model": {"type": "WordLevel", "vocab": {"x": 0}}}')
    data[len(data) // 2] ^= 0xFF
    (ckpt / name).write_bytes(bytes(data))
    for main, argv in [(train_cli.main, ["--config", str(tmp_path / "run.yaml"), "--out", str(run), "--resume",
                                         str(ckpt)]),
                       (eval_cli.main, ["depth", "--checkpoint", str(ckpt), "--depths", "1"]),
                       (generate_cli.main, ["--checkpoint", str(ckpt), "--prompt", "1+2=", "--depth", "1"])]:
        rc, err = run_main(main, argv)
        assert_one_line_exit2(rc, err, (name, argv[:2]))
        assert name in err and "not listed" in err
    # a run directory: the damaged newest checkpoint is named in one line, the older one is used
    rc, err = run_main(generate_cli.main, ["--checkpoint", str(run), "--prompt", "1+2=", "--depth", "1"])
    assert rc == 0, err
    assert name in err and "not listed" in err and "step_00000001" in err


def test_generate_refuses_a_corrupt_checkpoint(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    ckpt = run / "checkpoints" / "step_00000002"
    f = ckpt / "dcp" / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    rc, err = run_main(generate_cli.main, ["--checkpoint", str(ckpt), "--prompt", "1+2=", "--depth", "1"])
    assert_one_line_exit2(rc, err, "generate")
    assert "sha256" in err


def _edit_state(ckpt: Path, edit) -> None:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    edit(state)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def _edit_rank(ckpt: Path, edit) -> None:
    f = ckpt / "ranks" / "rank_00000.json"
    d = json.loads(f.read_text())
    edit(d)
    f.write_text(json.dumps(d))


STATE_EDITS = {
    "step_2^70": (lambda s: s.update(step=2**70), None, "'step'"),
    "tokens_seen_abc": (lambda s: s.update(tokens_seen="abc"), None, "'tokens_seen'"),
    "data_a_list": (lambda s: s.update(data=[1, 2]), None, "'data'"),
    "scheduler_junk": (lambda s: s.update(scheduler="junk"), None, "'scheduler'"),
    "scheduler_bad_field": (lambda s: s["scheduler"].update(last_epoch="x"), None, "scheduler.last_epoch"),
    "scheduler_short_list": (lambda s: s["scheduler"].update(base_lrs=[]), None, "scheduler.base_lrs"),
    "rng_wrong_length": (None, lambda d: d.update(rng=base64.b64encode(b"\0" * 16).decode()), "'rng'"),
    "rank_data_a_list": (None, lambda d: d.update(data=[1]), "'data'"),
}


@pytest.mark.parametrize("case", sorted(STATE_EDITS))
def test_trainer_state_fields_are_checked(trained, tmp_path, case):
    """The edits come with a matching manifest: the field checks, not the checksums, refuse them."""
    run = _copy_run(trained, tmp_path)
    state_edit, rank_edit, needle = STATE_EDITS[case]
    ck = run / "checkpoints" / "step_00000002"
    if state_edit:
        _edit_state(ck, state_edit)
    if rank_edit:
        _edit_rank(ck, rank_edit)
    _rewrite_manifest(ck)
    rc, err = _train(tmp_path / "run.yaml", run, "--resume", str(ck), "--set", "train.steps=3")
    assert_one_line_exit2(rc, err, case)
    assert needle in err, (case, err)


# --------------------------------------------------------------------------- metrics.jsonl on a full disk


def _disk_full_after(monkeypatch, good_lines: int, modules) -> None:
    """Appends to metrics.jsonl fail with ENOSPC after `good_lines` lines, half a line written."""
    import builtins

    real_open = builtins.open
    count = {"n": 0}

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            count["n"] += 1
            if count["n"] > good_lines:
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Full(f) if str(file).endswith("metrics.jsonl") and "a" in mode else f

    for mod in modules:
        monkeypatch.setattr(mod, "open", fake_open, raising=False)


def test_a_full_disk_while_logging_metrics_warns_once_and_training_goes_on(workdir, monkeypatch):
    from stars_scale.checkpoint import rundir
    from stars_scale.train import trainer

    _disk_full_after(monkeypatch, 2, [rundir, trainer])
    cfg = _config(workdir / "c.yaml", train={"steps": 5, "ckpt_every": 2})
    rc, err = _train(cfg, workdir / "r")
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len([ln for ln in lines if "metrics.jsonl" in ln]) == 1 and "No space left" in err, err
    assert (workdir / "r" / "checkpoints" / "step_00000005" / "manifest.json").is_file()
    logged = (workdir / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in logged] == [1, 2]  # whole lines only, no torn half line
    monkeypatch.undo()
    rc, err = _train(cfg, workdir / "r", "--resume", "--set", "train.steps=6")  # space again: the log goes on
    assert rc == 0, err
    assert [json.loads(ln)["step"] for ln in (workdir / "r" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 6]


# --------------------------------------------------------------------------- the MLflow warning


def test_an_mlflow_failure_is_one_warning_line(tmp_path, capfd):
    from stars_scale.tracking.mlflow_tracker import MlflowTracker

    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "e", run_name="r")
    try:
        capfd.readouterr()
        tracker.log_artifact(tmp_path / "no such\nfile.txt")  # MLflow's error text spans lines
        err = capfd.readouterr().err
    finally:
        tracker.close()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: MLflow log_artifact failed"), err
