"""Elastic restart: under `torchrun --max-restarts 1` a worker killed with SIGKILL after a checkpoint
makes the job restart and resume from the newest verified checkpoint without --resume; the job
exits 0 and its metrics equal an uninterrupted run's. A restart that finds another run's
checkpoints is refused in one line.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from stars_scale.errors import UserError
from multirank import BASE, make_cfg

STEPS, EVERY = 40, 5


def _config(tmp: Path) -> Path:
    d = copy.deepcopy(BASE)
    d["train"].update(steps=STEPS, ckpt_every=EVERY, keep_last=2, host_malloc="system")
    d["eval"] = {"depths": []}
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _torchrun(cfg: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.2", "-m", "stars_scale.cli.train",
           "--config", str(cfg), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=out.parent, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang fails the test instead of blocking CI
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"torchrun hung (killed after {timeout} s):\n{err[-4000:]}")
    return proc.returncode, err


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    out = []
    for c in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "stars_scale.cli.train" in " ".join(c.cmdline()):
                out.append(c)
        except psutil.NoSuchProcess:
            pass
    return out


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_a_killed_worker_restarts_the_job_which_resumes_and_matches_an_uninterrupted_run(tmp_path):
    cfg = _config(tmp_path)
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    proc = _torchrun(cfg, killed)
    first = killed / "checkpoints" / f"step_{2 * EVERY:08d}"
    deadline = time.time() + 300
    while not first.is_dir():
        if proc.poll() is not None or time.time() > deadline:
            rc, err = _finish(proc)
            pytest.fail(f"no checkpoint {first.name} before the end (rc {rc}):\n{err[-4000:]}")
        time.sleep(0.02)
    victims = _workers(proc)
    assert len(victims) == 2
    victims[-1].send_signal(signal.SIGKILL)
    rc, err = _finish(proc)
    assert rc == 0, err[-4000:]
    assert "torchrun restart 1: resuming from" in err, err[-4000:]
    resumed_at = int(err.split("torchrun restart 1: resuming from")[1].split("step_")[1][:8])
    assert resumed_at >= 2 * EVERY and resumed_at < STEPS, "the kill landed after the run had finished"

    rc, err = _finish(_torchrun(cfg, reference))
    assert rc == 0, err[-4000:]
    got, want = _losses(killed), _losses(reference)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # each step logged once
    assert got == want  # bit for bit


def test_a_restart_refuses_another_runs_checkpoints_and_resumes_its_own(tmp_path, monkeypatch):
    from stars_scale.train.trainer import Trainer

    out = tmp_path / "r"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    Trainer(make_cfg({}, {"steps": 4, "ckpt_every": 2, "host_malloc": "system"}), out, stop_after_steps=2).run()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(UserError, match="torchrun restart 1 found a checkpoint of another run"):
        Trainer(make_cfg({}, {"steps": 4, "ckpt_every": 2, "host_malloc": "system", "grad_accum": 2}), out)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")  # another torchrun job, same config
    with pytest.raises(UserError, match="another run"):
        Trainer(make_cfg({}, {"steps": 4, "ckpt_every": 2, "host_malloc": "system"}), out)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    t = Trainer(make_cfg({}, {"steps": 4, "ckpt_every": 2, "host_malloc": "system"}), out)
    assert t.step == 2
