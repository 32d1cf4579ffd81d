"""Missing optional packages are refused in one line, exit 2, before any work (the model is not
built, the run directory not created); tracking that cannot start refuses (tracking.required:
true) or says once, loudly, that the run is untracked. Each missing package is simulated in a
fresh interpreter by a `None` entry in sys.modules (Python's own "this module cannot be imported"),
and the CLI is driven as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from data_helpers import stars_data

REPO = Path(__file__).resolve().parents[1]
TINY = {"model": {"vocab_size": 15, "hidden": 16, "heads": 2, "mlp_hidden": 32, "max_seq_len": 16},
        "depth": {"dist": "fixed", "value": 2, "max": 2},
        "data": {"kind": "arithmetic", "digits": 2, "batch_size": 4, "test_size": 8},
        "train": {"steps": 1, "progress": False}, "eval": {"depths": []}, "tracking": {"mlflow": False}}


def cli(module: str, args: list[str], cwd: Path, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python -m <module> args` with the modules in `blocked` made unimportable."""
    code = ("import runpy, sys\n"
            f"for m in {list(blocked)!r}: sys.modules[m] = None\n"
            f"sys.argv = [{module!r}] + sys.argv[1:]\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def config(tmp: Path, **sections) -> Path:
    cfg = {k: dict(v) for k, v in TINY.items()}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    return lines[0]


def test_shards_without_webdataset_or_braceexpand_refused_before_the_model(tmp_path):
    res = stars_data("arithmetic", "--digits", "2", "--samples", "64", "--test-size", "8",
                     "--blocks-per-shard", "16", "--out", str(tmp_path / "arith"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cfg = config(tmp_path, data={"kind": "shards", "path": str(tmp_path / "arith"), "digits": 2})
    # (training on such shards with both installed: test_train_shards.py)
    for blocked in ("webdataset", "braceexpand"):
        res = cli("stars_scale.cli.train", ["--config", str(cfg), "--out", "run"], tmp_path, (blocked,))
        line = one_error_line(res)
        assert f"data.kind: shards needs {blocked}, not installed" in line, line
        assert not (tmp_path / "run").exists()  # nothing was started


def test_flash_attention_without_flash_attn_refused_before_the_model(tmp_path):
    cfg = config(tmp_path, model={"attention": "flash"})
    res = cli("stars_scale.cli.train", ["--config", str(cfg), "--out", "run"], tmp_path, ("flash_attn",))
    assert "model.attention: flash needs flash-attn" in one_error_line(res)
    assert not (tmp_path / "run").exists()


def test_depth_sweep_without_matplotlib_refused_before_the_model(tmp_path):
    cfg = config(tmp_path, eval={"depths": [1, 2]})
    res = cli("stars_scale.cli.train", ["--config", str(cfg), "--out", "run"], tmp_path, ("matplotlib",))
    assert "eval.depths needs matplotlib" in one_error_line(res)
    assert not (tmp_path / "run").exists()


def test_stars_eval_lm_without_lm_eval_refused_first(tmp_path):
    # the checkpoint does not exist: the missing package is named before anything is read
    res = cli("stars_scale.cli.eval", ["lm", "--checkpoint", str(tmp_path / "nothing"), "--tasks", "x"], tmp_path,
              ("lm_eval",))
    assert "lm-evaluation-harness is not installed" in one_error_line(res)


def test_required_tracking_with_a_store_mlflow_cannot_open_is_refused(tmp_path):
    """mlflow-skinny: no sqlalchemy/alembic, so MLflow refuses the default sqlite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config(tmp_path, tracking={"mlflow": True, "tracking_uri": uri, "required": True})
    res = cli("stars_scale.cli.train", ["--config", str(cfg), "--out", "run"], tmp_path, ("sqlalchemy",))
    line = one_error_line(res)
    assert "tracking.required: true, but MLflow cannot start" in line and "sqlalchemy" in line, line
    assert not (tmp_path / "run").exists()
    # mlflow itself missing, any store
    cfg = config(tmp_path, tracking={"mlflow": True, "tracking_uri": "http://127.0.0.1:9", "required": True})
    res = cli("stars_scale.cli.train", ["--config", str(cfg), "--out", "run"], tmp_path, ("mlflow",))
    assert "mlflow is not installed" in one_error_line(res)


def test_untracked_run_says_so_once_and_trains(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config(tmp_path, tracking={"mlflow": True, "tracking_uri": uri}, train={"steps": 2})
    res = cli("stars_scale.cli.train", ["--config", str(cfg), "--out", "run"], tmp_path, ("sqlalchemy",))
    assert res.returncode == 0, res.stderr[-3000:]
    warned = [ln for ln in res.stderr.splitlines() if "NOT tracked" in ln]
    assert len(warned) == 1 and warned[0].startswith("WARNING: this run is NOT tracked"), res.stderr[-3000:]
    assert "sqlalchemy" in warned[0] and "metrics go to run/metrics.jsonl only" in warned[0]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert "mlflow_run_id" not in json.loads(res.stdout.strip().splitlines()[-1])
    assert not (tmp_path / "mlflow.db").exists()


def test_required_tracking_against_a_dead_server_refused_before_any_work(tmp_path):
    """Packages present, the server's port closed: required -> one line, exit 2, nothing started."""
    cfg = config(tmp_path, tracking={"mlflow": True, "tracking_uri": "http://127.0.0.1:9", "required": True})
    res = cli("stars_scale.cli.train", ["--config", str(cfg), "--out", "run"], tmp_path)
    line = one_error_line(res)
    assert "tracking.required: true, but MLflow cannot start: MLflow at http://127.0.0.1:9" in line, line
    assert not (tmp_path / "run").exists()


def test_required_tracking_refused_when_the_tracker_cannot_open(tmp_path, monkeypatch):
    """What the preflight cannot see (a server that accepts the connection but fails, a store MLflow
    refuses): start_tracker refuses under required, else says once that the run is untracked."""
    import pytest

    from stars_scale.config import TrackingConfig
    from stars_scale.errors import UserError
    from stars_scale.tracking import start

    def broken(*a, **k):
        raise RuntimeError("500 Internal Server Error\nretry later")

    monkeypatch.setattr(start, "MlflowTracker", broken)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(UserError, match="tracking.required: true, but MLflow cannot start: MLflow at .* did not start "
                                        r"\(RuntimeError: 500 Internal Server Error retry later\)"):
        start.start_tracker(TrackingConfig(tracking_uri=uri, required=True), tmp_path / "m.jsonl")
    assert start.start_tracker(TrackingConfig(tracking_uri=uri), tmp_path / "m.jsonl") is None


def test_required_needs_mlflow_on(tmp_path):
    cfg = config(tmp_path, tracking={"mlflow": False, "required": True})
    res = cli("stars_scale.cli.train", ["--config", str(cfg), "--out", "run"], tmp_path)
    assert "tracking.required: true needs tracking.mlflow: true" in one_error_line(res)
