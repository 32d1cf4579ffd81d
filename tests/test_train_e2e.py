"""End to end through the console scripts, as a user runs them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "seed": 0,
    "model": {"vocab_size": 15, "hidden": 32, "heads": 2, "max_seq_len": 16, "mlp_hidden": 64},
    "depth": {"dist": "lognormal", "mu": 1.0, "sigma": 0.5, "max": 6, "backprop": 3},
    "stars": {"lam": 0.1, "method": "vjp", "iters": 1, "warmup_steps": 4},
    "data": {"digits": 3, "batch_size": 16, "test_size": 64},
    "optim": {"lr": 0.003, "warmup_steps": 2},
    "train": {"steps": 8, "ckpt_every": 4, "eval_every": 4, "progress": False},
    "eval": {"depths": [1, 2, 4], "samples": 64, "rho_iters": 3},
}


def env_for(tmp: Path) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def run(args, cwd, check=True):
    res = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, env=env_for(cwd),
                         timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"{args} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_checkpoint_eval_and_mlflow(tmp_path, tiny_config):
    res = run(["stars_scale.cli.train", "--config", str(tiny_config), "--out", "run"], tmp_path)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    run_dir = tmp_path / "run"
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("step", "loss", "ce", "penalty", "rho", "depth", "lr", "tokens_per_s"):
        assert key in rows[0]
    for r in rows:  # rho-hat every step (estimate_every 1); the penalty in the loss from step 4 on (convex)
        assert r["rho"] > 0 and r["penalty"] > 0, r
        want = r["ce"] if r["step"] <= 4 else 0.9 * r["ce"] + 0.1 * r["penalty"]
        assert r["loss"] == pytest.approx(want, rel=1e-6), r  # fp32 rounding of 3 operations: ~2e-7
    assert all(r["rho"] is not None for r in rows[4:])  # penalty on from step 4: rho every step
    assert (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000004", "step_00000008"]

    # stars-eval on the checkpoint writes the sweep and logs it to the same MLflow run
    run(["stars_scale.cli.eval", "depth", "--checkpoint", "run", "--depths", "1,2,4,8", "--out", "ev",
         "--samples", "32"], tmp_path)
    ds = json.loads((tmp_path / "ev" / "depth_scaling.json").read_text())
    assert ds["depths"] == [1, 2, 4, 8]
    for key in ("accuracy", "loss", "rho", "delta_h"):
        assert len(ds[key]) == 4 and all(isinstance(x, float) for x in ds[key])
    png = (tmp_path / "ev" / "depth_scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlrun = client.get_run(summary["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED"
    hist = client.get_metric_history(mlrun.info.run_id, "loss")
    assert sorted(m.step for m in hist) == list(range(1, 9))
    by_step = {m.step: m.value for m in hist}
    for r in rows:
        assert by_step[r["step"]] == pytest.approx(r["loss"])
    assert mlrun.data.params["stars.lam"] == "0.1"
    arts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"config.yaml", "depth_scaling.json", "depth_scaling.png"} <= arts
    assert len(client.get_metric_history(mlrun.info.run_id, "eval_accuracy")) >= 3


def test_resume_reproduces_uninterrupted_losses(tmp_path, tiny_config):
    base = ["stars_scale.cli.train", "--config", str(tiny_config), "--set", "tracking.mlflow=false",
            "--set", "train.steps=20", "--set", "train.ckpt_every=0", "--set", "eval.depths=[]",
            "--set", "train.eval_every=0", "--set", "model.dropout=0.1", "--set", "model.init_state=random",
            "--set", "model.injection=add"]
    run(base + ["--out", "full"], tmp_path)
    run(base + ["--out", "split", "--stop-after-steps", "10"], tmp_path)
    assert [r["step"] for r in metrics(tmp_path / "split")] == list(range(1, 11))
    run(base + ["--out", "split", "--resume"], tmp_path)
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 21))
    for a, b in zip(full, split):
        for key in ("loss", "ce", "penalty", "rho", "depth", "lr", "grad_norm"):
            assert a[key] == b[key], (a["step"], key)


@pytest.mark.parametrize("args,needle", [
    (["--set", "model.hiddn=3"], "model.hiddn: unknown config key"),
    (["--set", "model.hidden=big"], "model.hidden: expected an integer"),
    (["--set", "depth.value=-1"], "depth.value: must be >= 1, got -1"),
    (["--resume", "nowhere"], "nowhere: checkpoint not found"),
    (["--resume"], "no complete checkpoint"),
])
def test_bad_input_is_one_clear_line(tmp_path, tiny_config, args, needle):
    res = run(["stars_scale.cli.train", "--config", str(tiny_config), "--out", "r", *args], tmp_path, check=False)
    assert res.returncode == 2
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_missing_config_and_missing_checkpoint_for_eval(tmp_path):
    res = run(["stars_scale.cli.train", "--config", "nope.yaml"], tmp_path, check=False)
    assert res.returncode == 2 and "nope.yaml: config file not found" in res.stderr and "Traceback" not in res.stderr
    res = run(["stars_scale.cli.eval", "depth", "--checkpoint", "missing", "--depths", "1,2"], tmp_path, check=False)
    assert res.returncode == 2 and "missing: checkpoint not found" in res.stderr and "Traceback" not in res.stderr
    res = run(["stars_scale.cli.eval", "depth", "--checkpoint", ".", "--depths", "1,x"], tmp_path, check=False)
    assert res.returncode == 2 and "--depths" in res.stderr


def test_existing_run_is_never_overwritten(tmp_path, tiny_config):
    run(["stars_scale.cli.train", "--config", str(tiny_config), "--out", "r", "--set", "tracking.mlflow=false",
         "--set", "eval.depths=[]"], tmp_path)
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    res = run(["stars_scale.cli.train", "--config", str(tiny_config), "--out", "r", "--set", "tracking.mlflow=false"],
              tmp_path, check=False)
    assert res.returncode == 2 and "already holds checkpoints" in res.stderr
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_resume_auto_starts_fresh_and_a_finished_run_is_left_alone(tmp_path, tiny_config):
    base = ["stars_scale.cli.train", "--config", str(tiny_config), "--out", "r", "--set", "tracking.mlflow=false",
            "--set", "eval.depths=[]"]
    run(base + ["--resume", "auto"], tmp_path)  # nothing to resume yet: a fresh run (a requeued job's case)
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert len(before.splitlines()) == 8
    res = run(base + ["--resume"], tmp_path)  # already at train.steps: exits 0 and changes nothing
    assert "already trained to step 8" in res.stderr
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_trained_run_exports_to_hf_and_imports_back_bit_exact(tmp_path, tiny_config):
    import torch

    from stars_scale.convert import load_converted
    from stars_scale.checkpoint.dcp import read_checkpoint

    run(["stars_scale.cli.train", "--config", str(tiny_config), "--out", "r", "--set", "tracking.mlflow=false",
         "--set", "train.steps=4"], tmp_path)
    run(["stars_scale.cli.convert", "export", "r", "--to", "hf", "--out", "hf"], tmp_path)  # the run dir
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "depth" in card.lower() and (tmp_path / "hf" / "depth_scaling.json").is_file()
    run(["stars_scale.cli.convert", "import", "--from", "hf", "hf", "--out", "back"], tmp_path)
    _, sd = load_converted(tmp_path / "back")
    trained = read_checkpoint(tmp_path / "r" / "checkpoints" / "step_00000004")[1]
    assert set(sd) == set(trained)
    for name, t in trained.items():
        assert torch.equal(sd[name], t), name
