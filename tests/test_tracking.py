"""MLflow tracking against a real server: nothing blocks, nothing is lost when it goes away."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from stars_scale.tracking import MlflowTracker

TINY = {
    "model": {"vocab_size": 15, "hidden": 16, "heads": 2, "max_seq_len": 16, "mlp_hidden": 32},
    "depth": {"dist": "fixed", "value": 1},
    "data": {"digits": 3, "batch_size": 8, "test_size": 32},
    "train": {"steps": 3000, "progress": False},
    "stars": {"lam": 0.1, "method": "fd", "estimate_every": 1},
    "tracking": {"experiment": "outage", "system_metrics": True, "system_metrics_interval": 1.0},
}


def test_tracker_buffers_through_an_outage(mlflow_server):
    tracker = MlflowTracker(mlflow_server.uri, "buffering", run_name="unit", flush_interval=0.2)
    for step in range(1, 6):
        tracker.log_metrics({"x": step}, step)
    assert tracker.flush(60)
    mlflow_server.stop()
    t0 = time.perf_counter()
    for step in range(6, 206):
        tracker.log_metrics({"x": step, "y": -step}, step)
    assert time.perf_counter() - t0 < 5.0  # logging never waits on the server (generous bound)
    time.sleep(1.0)
    assert tracker.buffered > 0  # held while the server is down
    mlflow_server.start()
    tracker.close()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    steps = sorted(m.step for m in client.get_metric_history(tracker.run_id, "x"))
    assert steps == list(range(1, 206))
    assert len(client.get_metric_history(tracker.run_id, "y")) == 200


def test_training_run_survives_a_server_outage(tmp_path, mlflow_server):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=mlflow_server.uri)
    proc = subprocess.Popen([sys.executable, "-m", "stars_scale.cli.train", "--config", str(cfg), "--out", "run"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"

    def logged() -> int:
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    deadline = time.monotonic() + 300
    while logged() < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    mlflow_server.stop()  # down for part of the run
    down_at = logged()
    while logged() < down_at + 100 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logged() > down_at, "training stalled while the tracking server was down"
    mlflow_server.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    run_id = json.loads(out.strip().splitlines()[-1])["mlflow_run_id"]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert sorted(history) == [r["step"] for r in rows] == list(range(1, 3001))
    assert all(abs(history[r["step"]] - r["loss"]) < 1e-6 for r in rows)
    assert any(k.startswith("system/") for k in run.data.metrics)  # per-node system metrics


_START_TOGETHER = """
import os, sys, time
from pathlib import Path
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
from stars_scale.tracking import MlflowTracker
t = MlflowTracker(sys.argv[1], "race", run_name="r" + sys.argv[3])
t.log_metrics({"x": 1.0}, step=0)
t.close()
"""


def test_runs_starting_together_on_a_fresh_sqlite_store_are_all_tracked(tmp_path):
    """Several runs that open the same new sqlite store at once (a bench's --jobs 2, Slurm array
    tasks): MLflow's schema migration and the experiment's creation race unless serialised; every
    run must be tracked (measured before the lock: 'Online migration expected to match one row')."""
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _START_TOGETHER, uri, str(go), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    time.sleep(3.0)  # every process imported and waits
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["r0", "r1", "r2", "r3"]
