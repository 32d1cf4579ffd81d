"""stars-launch against a real two-node Slurm cluster (the `slurm_cluster` fixture) and the
`mlflow_server` fixture itself.

The payload is `stars_scale.launch.probe` (hidden --module option): it needs no trainer, does a
gloo all_reduce across the job's ranks and writes what each rank saw under <out>/probe/.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import CLUSTER_SCRIPT, SlurmCluster, free_port_block

PROBE = "stars_scale.launch.probe"
CONFIG = "model: {hidden: 32, heads: 2}\ntracking: {run_name: probe}\n"


def stars_launch(cluster: SlurmCluster, cwd: Path, *argv: str, env_extra: dict | None = None):
    env = cluster.env
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "stars_scale.cli.launch", "slurm", *argv],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def submit(cluster: SlurmCluster, tmp_path: Path, *argv: str, env_extra: dict | None = None) -> str:
    cfg = tmp_path / "probe.yaml"
    if not cfg.exists():
        cfg.write_text(CONFIG)
    res = stars_launch(cluster, tmp_path, "--config", str(cfg), "--module", PROBE,
                       "--partition", cluster.partition, *argv, env_extra=env_extra)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    assert job_id.isdigit(), res.stdout
    return job_id


def job_log(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("*.out")))


def probe_records(run_dir: Path, attempt: int = 0) -> list[dict]:
    return [json.loads(p.read_text())
            for p in sorted((run_dir / "probe").glob(f"attempt{attempt}-rank*.json"))]


def wait_for(predicate, timeout: float, what: str, diagnostics=lambda: ""):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{diagnostics()}")
        time.sleep(0.3)


def test_cluster_has_two_idle_nodes(slurm_cluster):
    res = slurm_cluster.status()
    assert res.returncode == 0, res.stdout + res.stderr
    out = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %P %T").stdout.split("\n")
    nodes = {line.split()[0] for line in out if line.strip()}
    assert nodes == {"n1", "n2"}
    assert f"export SLURM_CONF={slurm_cluster.conf}" in res.stdout


def test_two_node_torchrun_rendezvous(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, tmp_path, "--nodes", "2", "--out", str(run_dir))
    state = slurm_cluster.wait_job(job)
    assert state == "COMPLETED", job_log(run_dir)
    recs = probe_records(run_dir)
    assert sorted(r["rank"] for r in recs) == [0, 1], job_log(run_dir)
    assert {r["world_size"] for r in recs} == {2}
    assert {r["node"] for r in recs} == {"n1", "n2"}  # one torchrun per node
    assert all(r["allreduce_ok"] for r in recs)
    for r in recs:
        assert r["env"]["STARS_LAUNCH_MODE"] == "torchrun"
        # n1 does not resolve: the rendezvous host is n1's NodeAddr
        assert r["env"]["MASTER_ADDR"] == "127.0.0.1"
        assert r["argv"] == ["--config", str(run_dir / "slurm" / "config.yaml"), "--out", str(run_dir)]
        assert not r["resume"]
    log = job_log(run_dir)
    assert f"head n1 at 127.0.0.1:{20000 + int(job) % 10000}" in log


def test_two_node_srun_mode_one_task_per_process(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, tmp_path, "--nodes", "2", "--procs-per-node", "2", "--mode", "srun",
                 "--out", str(run_dir))
    assert slurm_cluster.wait_job(job) == "COMPLETED", job_log(run_dir)
    recs = probe_records(run_dir)
    assert sorted(r["rank"] for r in recs) == [0, 1, 2, 3], job_log(run_dir)
    assert {r["world_size"] for r in recs} == {4}
    by_node = {}
    for r in recs:
        assert r["env"]["SLURM_PROCID"] == str(r["rank"])  # Megatron's way: rank = SLURM_PROCID
        assert r["local_world_size"] == 2
        by_node.setdefault(r["node"], set()).add(r["local_rank"])
    assert by_node == {"n1": {0, 1}, "n2": {0, 1}}
    assert all(r["allreduce_ok"] for r in recs)


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """USR1 to the batch shell (as --signal=B:USR1@T does before the time limit) reaches the
    ranks on both nodes; they 'checkpoint' and exit 0; the script requeues the job; the
    second run gets --resume, the same run directory, and finds the checkpoint."""
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, tmp_path, "--nodes", "2", "--out", str(run_dir),
                 env_extra={"STARS_PROBE_HOLD": "120"})
    wait_for(lambda: len(probe_records(run_dir, 0)) == 2, 180, "both ranks of the first run",
             lambda: job_log(run_dir) + slurm_cluster.logs_tail())
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    wait_for(lambda: len(probe_records(run_dir, 1)) == 2, 180, "both ranks of the requeued run",
             lambda: job_log(run_dir) + slurm_cluster.logs_tail())
    assert slurm_cluster.wait_job(job) == "COMPLETED", job_log(run_dir)
    assert slurm_cluster.job_info(job)["Restarts"] == "1"

    first, second = probe_records(run_dir, 0), probe_records(run_dir, 1)
    assert all(r["stopped_on_signal"] and "SIGUSR1" in r["signals"] for r in first), first
    checkpoint = json.loads((run_dir / "probe" / "checkpoint.json").read_text())
    assert checkpoint["attempt"] == 0 and checkpoint["world_size"] == 2
    for r in second:
        assert r["resume"] and r["argv"][-2:] == ["--resume", "auto"]
        assert r["argv"][:4] == ["--config", str(run_dir / "slurm" / "config.yaml"), "--out", str(run_dir)]
        assert r["checkpoint_found"] == checkpoint
        assert not r["stopped_on_signal"]
    assert {r["node"] for r in second} == {"n1", "n2"}
    log = job_log(run_dir)
    assert "requeueing job" in log and "restart 1 on" in log  # both runs append to one log


def test_term_reaches_the_ranks_and_torchrun_waits_for_them(slurm_cluster, tmp_path):
    """TERM to the job steps (cancel, time limit): every rank checkpoints and exits 0, and
    torchrun does not turn the TERM into a failure of its own (it would kill its workers)."""
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, tmp_path, "--nodes", "2", "--out", str(run_dir),
                 env_extra={"STARS_PROBE_HOLD": "120"})
    wait_for(lambda: len(probe_records(run_dir, 0)) == 2, 180, "both ranks",
             lambda: job_log(run_dir) + slurm_cluster.logs_tail())
    slurm_cluster.run("scancel", "--signal=TERM", job)  # the steps, not the batch shell
    assert slurm_cluster.wait_job(job) == "COMPLETED", job_log(run_dir)
    recs = probe_records(run_dir, 0)
    assert all(r["stopped_on_signal"] and "SIGTERM" in r["signals"] for r in recs), recs
    assert (run_dir / "probe" / "checkpoint.json").is_file()
    log = job_log(run_dir)
    assert "SignalException" not in log and "requeueing" not in log
    assert slurm_cluster.job_info(job)["Restarts"] == "0"


def test_partition_checked_against_sinfo(slurm_cluster, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    res = stars_launch(slurm_cluster, tmp_path, "--config", str(cfg), "--nodes", "1",
                       "--partition", "nosuch", "--dry-run")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == "error: --partition 'nosuch': no such partition on this cluster (sinfo lists: debug)\n"
    res = stars_launch(slurm_cluster, tmp_path, "--config", str(cfg), "--nodes", "1",
                       "--partition", "debug", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --partition=debug" in res.stdout


def test_array_sweep_one_task_per_value_under_an_mlflow_parent(slurm_cluster, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    experiment = f"sweep-{uuid.uuid4().hex[:8]}"
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(f"model: {{hidden: 32, heads: 2}}\n"
                   f"tracking: {{run_name: lam, tracking_uri: '{mlflow_server.uri}', experiment: {experiment}}}\n")
    run_dir = tmp_path / "sweep"
    job = submit(slurm_cluster, tmp_path, "--nodes", "1", "--out", str(run_dir),
                 "--array", "stars.lam=0,0.1")
    assert slurm_cluster.wait_job(job) == "COMPLETED", job_log(run_dir)

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], "tags.`stars.role` = 'sweep-parent'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["slurm.job_id"] == job
    assert parent.data.tags["stars.sweep_size"] == "2"
    assert parent.info.run_name == "lam-sweep"

    sweep = json.loads((run_dir / "sweep.json").read_text())
    seen = {}
    for task in sweep["tasks"]:
        recs = probe_records(Path(task["run_dir"]))
        assert len(recs) == 1, job_log(run_dir)
        r = recs[0]
        assert r["env"]["STARS_MLFLOW_PARENT_RUN_ID"] == parent.info.run_id
        assert r["env"]["STARS_SWEEP_INDEX"] == str(task["index"])
        assert r["env"]["SLURM_ARRAY_TASK_ID"] == str(task["index"])
        assert r["env"]["STARS_SWEEP_OVERRIDES"] == " ".join(task["overrides"])
        assert r["env"]["STARS_RUN_DIR"] == task["run_dir"]
        assert r["config"]["tracking.run_name"] == f"lam-{Path(task['run_dir']).name}"
        seen[task["index"]] = r["config"]["stars.lam"]
    assert seen == {0: 0.0, 1: 0.1}


def alive(pid: int) -> bool:
    """Running and not a zombie (daemons are reparented to pid 1, which may reap them late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def processes_with_env(entry: str, comm: str | None = None) -> list[int]:
    """Live processes whose environment holds `entry` (e.g. SLURM_CONF=...)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not alive(int(proc.name)):
            continue
        try:
            if comm and (proc / "comm").read_text().strip() != comm:
                continue
            if entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                out.append(int(proc.name))
        except OSError:
            continue
    return out


def test_cluster_script_up_down_stops_exactly_its_daemons(slurm_cluster):
    """A second, private cluster: `down` stops the daemons `up` started and nothing else."""
    state = Path(tempfile.mkdtemp(prefix="stars-slurm-t-", dir="/tmp"))
    state.chmod(0o755)
    other = SlurmCluster(state, free_port_block(3), 500)
    try:
        up = other.up()
        assert up.returncode == 0, up.stderr + other.logs_tail()
        assert f"export SLURM_CONF={state}/slurm.conf" in up.stdout
        pids = {f.name: int(f.read_text()) for f in (state / "run").glob("*.pid")}
        assert set(pids) == {"munged.pid", "slurmctld.pid", "slurmd-n1.pid", "slurmd-n2.pid"}
        again = other.up()  # idempotent: a running cluster is left as it is
        assert again.returncode == 0 and "already up" in again.stderr
        assert {f.name: int(f.read_text()) for f in (state / "run").glob("*.pid")} == pids
        # A running 2-node job whose controller dies first: `down` still leaves no job process.
        job = other.run("sbatch", "--parsable", "-N2", "-o", "/dev/null", "--wrap",
                        "trap '' TERM; srun sleep 300").stdout.strip()
        wait_for(lambda: other.job_state(job) == "RUNNING"
                 and len(processes_with_env(f"SLURM_CONF={other.conf}", "sleep")) == 2,
                 60, "the job's two sleeps", other.logs_tail)
        os.kill(pids["slurmctld.pid"], signal.SIGTERM)
        down = other.down()
        assert down.returncode == 0, down.stderr
        for name, pid in pids.items():
            assert not alive(pid), name
        assert processes_with_env(f"SLURM_CONF={other.conf}") == []
        assert other.status().returncode == 1
        # the session's cluster is untouched
        assert slurm_cluster.status().returncode == 0
    finally:
        other.down()
        shutil.rmtree(state, ignore_errors=True)


def test_cluster_script_usage():
    res = subprocess.run(["bash", str(CLUSTER_SCRIPT), "restart"], capture_output=True, text=True)
    assert res.returncode == 2 and "usage:" in res.stderr


def test_mlflow_server_fixture_start_log_stop_restart(mlflow_server):
    from mlflow.tracking import MlflowClient

    assert mlflow_server.healthy()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp_id = client.create_experiment(f"fixture-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "loss", 1.5, step=3)
    mlflow_server.stop()
    assert not mlflow_server.healthy() and not mlflow_server.running
    mlflow_server.start()
    assert mlflow_server.healthy()
    hist = MlflowClient(tracking_uri=mlflow_server.uri).get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(3, 1.5)]
