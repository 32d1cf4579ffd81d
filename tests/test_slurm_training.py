"""Real training through Slurm: a 2-node job (one torchrun per node, gloo) tracked in a real
MLflow server, and a preempted job that checkpoints, requeues, resumes and ends where an
uninterrupted job ends, in one MLflow run."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from test_slurm import job_log, stars_launch, wait_for

CONFIG = {
    "seed": 1,
    "model": {"vocab_size": 15, "hidden": 16, "heads": 2, "max_seq_len": 16, "mlp_hidden": 32},
    "depth": {"dist": "lognormal", "mu": 0.5, "sigma": 0.5, "max": 3},
    "stars": {"lam": 0.1, "method": "fd", "warmup_steps": 5},
    "data": {"digits": 3, "batch_size": 8, "test_size": 32},
    "train": {"steps": 40, "ckpt_every": 10, "progress": False},
    "eval": {"depths": [1, 2, 4], "samples": 32, "rho_iters": 2},
    "tracking": {"experiment": "slurm"},
}


def launch(cluster, tmp_path: Path, name: str, cfg: dict, mlflow_uri: str) -> tuple[str, Path]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / name
    res = stars_launch(cluster, tmp_path, "--config", str(path), "--nodes", "2", "--partition", cluster.partition,
                       "--out", str(out), env_extra={"MLFLOW_TRACKING_URI": mlflow_uri, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    return res.stdout.strip(), out


def metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []


def mlflow_run_id(out: Path) -> str:
    latest = sorted((out / "checkpoints").glob("step_*"))[-1]
    return json.loads((latest / "trainer_state.json").read_text())["mlflow_run_id"]


def test_two_node_job_trains_and_tracks(slurm_cluster, mlflow_server, tmp_path):
    cfg = {**CONFIG, "tracking": {**CONFIG["tracking"], "system_metrics": True, "system_metrics_interval": 0.5}}
    job, out = launch(slurm_cluster, tmp_path, "two_nodes", cfg, mlflow_server.uri)
    assert slurm_cluster.wait_job(job, timeout=600) == "COMPLETED", job_log(out) + slurm_cluster.logs_tail()
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 41))
    state = json.loads((out / "checkpoints" / "step_00000040" / "trainer_state.json").read_text())
    assert state["layout"]["dp"] == 2  # one rank on n1, one on n2
    assert (out / "depth_scaling.json").is_file()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(mlflow_run_id(out))
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("slurm.job_id") == job
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(history) == list(range(1, 41))
    assert all(abs(history[r["step"]] - r["loss"]) < 1e-6 for r in rows)
    nodes = {k.split("/")[1] for k in run.data.metrics if k.startswith("system/")}
    assert nodes == {"node0", "node1"}  # one system-metrics sampler per node, in the same run
    assert run.data.params["parallel.tp"] == "1" and run.data.tags["stars.layout"].startswith("tp1-pp1-dp2")


def test_preempted_job_requeues_resumes_and_matches(slurm_cluster, mlflow_server, tmp_path):
    cfg = {**CONFIG, "train": {**CONFIG["train"], "steps": 400, "ckpt_every": 0}}
    ref_job, ref = launch(slurm_cluster, tmp_path, "reference", cfg, mlflow_server.uri)
    assert slurm_cluster.wait_job(ref_job, timeout=900) == "COMPLETED", job_log(ref)

    job, out = launch(slurm_cluster, tmp_path, "preempted", cfg, mlflow_server.uri)
    wait_for(lambda: len(metrics(out)) >= 20, 300, "20 training steps", lambda: job_log(out))
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@T sends
    assert slurm_cluster.wait_job(job, timeout=900) == "COMPLETED", job_log(out) + slurm_cluster.logs_tail()
    assert slurm_cluster.job_info(job)["Restarts"] == "1"
    log = job_log(out)
    assert "requeueing job" in log

    rows, ref_rows = metrics(out), metrics(ref)
    assert [r["step"] for r in rows] == list(range(1, 401))  # resumed, no step lost or repeated
    assert rows[-1]["loss"] == ref_rows[-1]["loss"]
    for a, b in zip(rows, ref_rows):
        assert a["loss"] == b["loss"], a["step"]
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run_id = mlflow_run_id(out)
    runs = client.search_runs([client.get_experiment_by_name("slurm").experiment_id],
                              filter_string="tags.`stars.out_dir` = '%s'" % out.resolve())
    assert [r.info.run_id for r in runs] == [run_id]  # one MLflow run across both attempts
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 401))
