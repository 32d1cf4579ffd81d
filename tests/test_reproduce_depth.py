"""bench/reproduce_depth.py end to end on tiny overrides: the main job (one seed, one thread), the
easy-to-hard difficulty x depth tables of the STARS and fixed-depth configs, and the exit-rule
table, all in one JSON with each run's timing and the issue's targets checked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.hidden=16", "model.heads=2", "model.mlp_hidden=32", "train.steps=3", "train.eval_every=0",
        "data.batch_size=8", "data.test_size=16", "eval.samples=16", "eval.depths=[1,4,64]", "eval.rho_iters=2",
        "stars.warmup_steps=1", "train.ckpt_every=0", "tracking.mlflow=false"]


def test_reproduce_depth_tiny(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "reproduce_depth.py"), "--seeds", "0", "--threads", "1",
           "--jobs", "2", "--samples", "16", "--exit-samples", "8", "--out", str(tmp_path / "runs"),
           "--docs", str(tmp_path / "docs")] + [x for o in TINY for x in ("--set", o)]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    table = json.loads((tmp_path / "docs" / "depth_results.json").read_text())
    runs = table["main"]["runs"]
    assert [(r["seed"], r["threads"]) for r in runs] == [(0, 1)]
    for r in runs:
        assert r["depths"] == [1, 4, 64] and r["r1"] == r["accuracy"][0] and r["best"] == max(r["accuracy"])
        assert r["timing"]["torch_threads"] == str(r["threads"]) and r["user_seconds"] > 0
        assert r["ok_r64_ge_97pct_best"] == (r["accuracy"][2] >= 0.97 * r["best"])
    for label in ("stars", "fixed"):
        e = table["e2h"][label]
        (seed,) = e["per_seed"]
        assert e["train_depth"] == 3 and list(seed["accuracy"]) == [str(k) for k in range(1, 9)]  # n = 4: 1..2n
        assert set(seed["best_over_train_depth_on_n+1..1.5n"]) == {"5", "6"}
        assert (tmp_path / "docs" / f"chains_difficulty_{label}.png").stat().st_size > 5_000
    ex = table["exit"]
    assert {r["rule"] for r in ex["rules"]} == {"contraction", "delta", "kl", "confidence"} and len(ex["rules"]) == 10
    assert ex["oracle"]["accuracy"] >= ex["best_fixed"] and set(ex["oracle"]["by_group"]) == {str(k) for k in range(1, 7)}
    assert all(set(r["by_group"]) == set(ex["oracle"]["by_group"]) for r in ex["rules"])
    assert ex["smallest_fixed_within_0.5pt"] in ex["fixed"] or str(ex["smallest_fixed_within_0.5pt"]) in ex["fixed"]
    for png in ("chains_depth_scaling.png", "test_time_chains.png"):
        assert (tmp_path / "docs" / png).read_bytes()[:4] == b"\x89PNG"
    assert "| 0 | 1 |" in p.stdout and "first r ≥ 90%" in p.stdout
