"""bench/reproduce_text.py end to end on a stdlib slice and tiny overrides: the three text configs train
one after another, the figure and the JSON table hold each run's loss/perplexity sweep and timing, and
a second call reuses the finished runs."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from data_helpers import stars_data

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.hidden=16", "model.mlp_hidden=32", "model.vocab_size=300", "model.max_seq_len=32",
        "train.steps=3", "train.eval_every=0", "data.batch_size=4", "data.val_batches=2", "eval.depths=[1,4,16]",
        "eval.rho_iters=2", "tracking.mlflow=false"]


def test_reproduce_text_trains_the_three_configs_and_tabulates_loss_against_depth(tmp_path):
    res = stars_data("corpus", "--max-bytes", "150kB", "--val-fraction", "0.2", "--vocab-size", "300", "--seq-len",
                     "32", "--shard-size", "20kB", "--out", tmp_path / "data")
    assert res.returncode == 0, res.stderr
    cmd = [sys.executable, str(REPO / "bench" / "reproduce_text.py"), "--seeds", "0", "--data", str(tmp_path / "data"),
           "--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs")] + [x for o in TINY for x in ("--set", o)]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "docs" / "text_depth_scaling.png").stat().st_size > 10_000
    table = json.loads((tmp_path / "docs" / "text_results.json").read_text())
    assert table["seeds"] == [0] and table["corpus"]["kind"] == "python-stdlib"
    assert set(table["configs"]) == {"text_tiny", "text_tiny_lognormal", "text_tiny_fixed"}
    for name, c in table["configs"].items():
        (seed,) = c["seeds"]
        assert seed["depths"] == [1, 4, 16] and len(seed["loss"]) == 3
        assert seed["perplexity"] == [math.exp(x) for x in seed["loss"]]
        assert seed["best_loss"] == min(seed["loss"]) and seed["loss_at_1x_train_depth"] == seed["loss"][1]
        assert seed["timing"]["cpu_seconds"] > 0 and seed["timing"]["torch_threads"] == "1"
        assert Path(seed["run_dir"]) == tmp_path / "runs" / name / "seed0"
        cfg = (Path(seed["run_dir"]) / "config.yaml").read_text()
        assert ("dist: fixed" in cfg) == (name == "text_tiny_fixed")
    assert "| STARS (log-normal depth + penalty) | 0 |" in p.stdout
    mtimes = [(tmp_path / "runs" / n / "seed0" / "metrics.jsonl").stat().st_mtime_ns for n in table["configs"]]
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr.count("reusing") == 1, again.stderr[-2000:]  # only the data line
    table_lines = lambda out: [ln for ln in out.splitlines() if ln.startswith("|")]  # noqa: E731
    assert table_lines(again.stdout) == table_lines(p.stdout) and len(table_lines(p.stdout)) == 2 + 3 * 2
    assert [(tmp_path / "runs" / n / "seed0" / "metrics.jsonl").stat().st_mtime_ns for n in table["configs"]] == mtimes
    bad = subprocess.run(cmd + ["--set", "depth.nope=1"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "depth.nope" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
