"""The README's main job as a newcomer meets it: the first command trains configs/chains_tiny.yaml, the
README's example prompt is a problem of that config with the answer the README gives, and the shipped
config (at tiny width and a few steps, everything else as shipped, MLflow on) trains, sweeps depth over
difficulty and generates the example's answer token through the console paths the README names."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from stars_scale.config import load_config
from stars_scale.data.chains import VOCAB, bindings, encode_text, solve

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TINY = ["model.hidden=16", "model.heads=2", "model.mlp_hidden=32", "train.steps=3", "train.eval_every=0",
        "train.ckpt_every=0", "data.batch_size=8", "data.test_size=24", "eval.samples=24", "eval.depths=[1,8]",
        "eval.rho_iters=2", "stars.warmup_steps=1", "train.progress=false"]


def readme_prompt() -> str:
    m = re.search(r"stars-generate --checkpoint runs/chains_tiny --prompt '([^']+)'", README)
    assert m, "the README shows stars-generate on the main job's run"
    return m.group(1)


def test_readme_first_command_trains_the_chains_main_job():
    first = README.split("```bash", 1)[1].split("```", 1)[0]
    assert re.search(r"stars-train --config configs/chains_tiny\.yaml\s*$", first.strip()), first
    cfg = load_config(ROOT / "configs" / "chains_tiny.yaml")
    assert cfg.data.kind == "chains" and cfg.data.names == "slot" and cfg.data.value_first and cfg.data.matched
    assert "runs/chains_tiny/" in README and "configs/chains_tiny.yaml" in README


def test_readme_example_prompt_is_a_problem_of_the_main_job():
    cfg = load_config(ROOT / "configs" / "chains_tiny.yaml")
    toks = encode_text(readme_prompt())
    assert len(toks) == 2 * cfg.data.statements + 2  # S statements, the queried letter, '?'
    binds = bindings(toks, value_first=True)
    letters = [VOCAB[t] for t in binds]
    assert letters == [chr(ord("a") + s) for s in range(cfg.data.statements)]  # slot names: statement s binds letter s
    answer, lookups = solve(toks, value_first=True)
    assert (answer, lookups) == (9, 4)
    assert "r = q = n = c = 9" in README
    # matched: the three chains are all as long as the query's (k = 4) -- three letters resolve at depth 4
    depth_of = {v: solve(toks[: 2 * cfg.data.statements] + [v, toks[-1]], value_first=True)[1] for v in binds}
    assert sorted(depth_of.values()).count(4) == cfg.data.chains and max(depth_of.values()) == 4
    lo, hi = cfg.data.difficulty
    assert lo <= lookups <= hi


def test_shipped_main_job_config_trains_sweeps_and_generates(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the README's local store

    def cli(*args):
        res = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             env={**env, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    sets = [x for o in TINY for x in ("--set", o)]
    res = cli("stars_scale.cli.train", "--config", str(ROOT / "configs" / "chains_tiny.yaml"), "--out",
              "runs/chains_tiny", *sets)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["mlflow_run_id"] and (tmp_path / "mlflow.db").is_file()
    sweep = json.loads((tmp_path / "runs/chains_tiny/depth_scaling.json").read_text())
    assert sweep["depths"] == [1, 8] and all(0 <= a <= 1 for a in sweep["accuracy"])
    res = cli("stars_scale.cli.eval", "depth", "--checkpoint", "runs/chains_tiny", "--difficulty", "1..6",
              "--depths", "1,2,8", "--samples", "12", "--out", "ev", "--no-mlflow")
    grid = json.loads((tmp_path / "ev/difficulty_depth.json").read_text())
    assert grid["difficulties"] == list(range(1, 7)) and grid["train_difficulty"] == [1, 6]
    res = cli("stars_scale.cli.generate", "--checkpoint", "runs/chains_tiny", "--prompt", readme_prompt(),
              "--depth", "8", "--json")
    out = json.loads(res.stdout)
    assert out["prompt"] == readme_prompt() and out["loops"][0] == 8 and len(out["tokens"]) >= 1
