"""Layouts are checked before any process group exists; `torchrun -m stars_scale.cli.train` works."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stars_scale.errors import ConfigError
from stars_scale.parallel.layout import check_layout
from multirank import BASE, make_cfg


def _cfg(parallel=None, **sections):
    cfg = make_cfg(parallel or {})
    for section, values in sections.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    return cfg


@pytest.mark.parametrize("parallel,world,sections,needle", [
    ({"tp": 2}, 3, {}, "parallel.tp × parallel.pp = 2 × 1 = 2 does not divide the world size 3"),
    ({"tp": 2, "pp": 2}, 6, {}, "does not divide the world size 6"),
    ({"tp": 4}, 4, {}, "model.heads=2 is not divisible by parallel.tp=4"),
    ({"tp": 2}, 2, {"model": {"heads": 4, "kv_heads": 1}}, "model.kv_heads=1 is not divisible by parallel.tp=2"),
    ({"pp": 4}, 4, {}, "parallel.pp=4 is larger than model.n_core=2"),
    ({"microbatches": 3}, 2, {}, "data.batch_size=8 is not divisible by dp × parallel.microbatches = 2 × 3"),
    ({"tp": 2}, 2, {"stars": {"method": "vjp"}}, "use stars.method: fd"),
    ({"pp": 2}, 2, {"stars": {"method": "jvp"}}, "use stars.method: fd"),
])
def test_bad_layouts_are_clear_errors(parallel, world, sections, needle):
    with pytest.raises(ConfigError) as e:
        check_layout(_cfg(parallel, **sections), world)
    assert needle in str(e.value)


def test_good_layouts_give_the_data_parallel_size():
    assert check_layout(_cfg({"tp": 2}), 8) == 4
    assert check_layout(_cfg({"tp": 2, "pp": 2, "microbatches": 2}), 8) == 2
    # vjp stays allowed without tensor/pipeline parallelism (pure data parallel)
    assert check_layout(_cfg({}, stars={"method": "vjp"}), 2) == 2


def _env() -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return env


def _torchrun(args: list[str], cwd: Path, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "stars_scale.cli.train", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def config_file(tmp_path) -> Path:
    d = json.loads(json.dumps(BASE))
    d["train"].update(steps=3, ckpt_every=2)
    d["tracking"] = {"mlflow": True}
    d["eval"] = {"depths": [1, 3], "samples": 16, "rho_iters": 2}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_torchrun_bad_layout_fails_with_one_clear_line(tmp_path, config_file):
    res = _torchrun(["--config", str(config_file), "--out", "r", "--set", "parallel.tp=3"], tmp_path, timeout=120)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if "does not divide the world size 2" in ln]
    # torchrun stops the other rank as soon as the first one exits, so whether the second rank gets
    # to print its line is a race: one or two lines (each rank on its own is checked below)
    assert len(lines) in (1, 2), res.stderr[-3000:]
    # the ranks' own output is those lines only (the traceback after them is torchrun's report)
    assert "ConfigError" not in res.stderr and "stars_scale/parallel" not in res.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_rejects_a_bad_layout_without_waiting_for_the_others(tmp_path, config_file, rank):
    # a rank started alone, with its partner never coming, must still exit 2 with the one line:
    # the layout is checked before anything could block on the process group
    env = _env()
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    res = subprocess.run([sys.executable, "-m", "stars_scale.cli.train", "--config", str(config_file), "--out", "r",
                          "--set", "parallel.tp=3"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [
        "error: parallel.tp × parallel.pp = 3 × 1 = 3 does not divide the world size 2: "
        "run a multiple of 3 processes or change parallel.tp/pp"], res.stderr[-3000:]
    assert not (tmp_path / "r").exists()


def test_torchrun_tp2_trains_logs_once_and_checkpoints_per_rank(tmp_path, config_file):
    res = _torchrun(["--config", str(config_file), "--out", "run", "--set", "parallel.tp=2",
                     "--set", "parallel.microbatches=2"], tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    summaries = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["step"] == 3  # printed by the logger only
    run = tmp_path / "run"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000002", "step_00000003"]
    last = run / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in last.glob("dcp/*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    assert sorted(p.name for p in last.glob("ranks/*.json")) == ["rank_00000.json", "rank_00001.json"]
    assert json.loads((last / "trainer_state.json").read_text())["layout"]["tp"] == 2
    ds = json.loads((run / "depth_scaling.json").read_text())
    assert ds["depths"] == [1, 3]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_info = client.get_run(summaries[0]["mlflow_run_id"])
    hist = client.get_metric_history(run_info.info.run_id, "loss")
    assert sorted(m.step for m in hist) == [1, 2, 3]  # once per step: one rank logs
    assert run_info.data.tags["stars.layout"] == "tp2-pp1-dp1-zero0"
    assert run_info.info.status == "FINISHED"


def test_dp_ranks_together_read_the_one_process_batch():
    import torch

    from stars_scale.data.sources import build_train_source

    cfg = make_cfg({})
    one = build_train_source(cfg)
    ranks = [build_train_source(cfg, r, 4) for r in range(4)]
    for _ in range(3):
        full = one.next_batch()
        parts = [src.next_batch() for src in ranks]
        for key in ("input_ids", "labels"):
            assert torch.equal(torch.cat([p[key] for p in parts]), full[key])


def test_stage_split_and_pass_plan():
    from stars_scale.parallel.pipeline import Pass, pass_plan, stage_bounds
    from stars_scale.stars.depth import Depth

    assert [stage_bounds(5, 2, s) for s in range(2)] == [(0, 3), (3, 5)]
    assert [stage_bounds(4, 4, s) for s in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    stars = make_cfg({}).stars  # fd, 2 power iterations, penalty on from step 1
    # truncated BPTT: 3 free iterations without a graph, then 2 with; estimator off at step 0
    # (estimate_every=1 still estimates: f(h) and two f(h + εv) evaluations, all without graph)
    assert pass_plan(Depth(3, 2), stars, 0) == [Pass("iter", False)] * 3 + [Pass("iter", True)] * 2 + \
        [Pass("fd", False)] * 3
    # penalty on: f(h) and the last evaluation carry the graph, the first only picks the direction
    assert pass_plan(Depth(0, 2), stars, 1)[2:] == [Pass("fd", True), Pass("fd", False), Pass("fd", True)]
