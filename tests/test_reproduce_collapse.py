"""bench/reproduce_collapse.py end to end on tiny overrides: the three configs train (two at a time
with --jobs 2), the figure and the JSON table are written with each run's sweep, CPU time and the
targets; a second call reuses the finished runs, and a call whose --set differs from the runs
already in --out is refused in one line (exit 2) instead of mixing two settings in one table.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.hidden=16", "model.mlp_hidden=32", "train.steps=3", "train.eval_every=0", "data.batch_size=8",
        "data.test_size=16", "eval.samples=16", "eval.depths=[1,4,16,32]", "eval.rho_iters=2",
        "tracking.mlflow=false"]


def _run(tmp: Path, extra: list[str], args: tuple = ("--seeds", "0")) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "bench" / "reproduce_collapse.py"), *args, "--jobs", "2",
           "--out", str(tmp / "runs"), "--docs", str(tmp / "docs")]
    cmd += [x for o in TINY + extra for x in ("--set", o)]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)


def test_reproduce_collapse_trains_tabulates_reuses_and_refuses_mixed_settings(tmp_path):
    p = _run(tmp_path, [])
    assert p.returncode == 0, p.stderr[-3000:]
    table = json.loads((tmp_path / "docs" / "collapse_results.json").read_text())
    assert (tmp_path / "docs" / "collapse_depth_scaling.png").stat().st_size > 10_000
    assert table["seeds"] == [0] and table["overrides"] == TINY
    assert set(table["configs"]) == {"collapse_fixed", "collapse_lognormal", "collapse_stars"}
    for name, c in table["configs"].items():
        (seed,) = c["seeds"]
        assert seed["depths"] == [1, 4, 16, 32] and len(seed["accuracy"]) == 4
        assert seed["train_depth"] == 4 and seed["peak"] == max(seed["accuracy"])
        assert seed["timing"]["cpu_seconds"] > 0 and seed["timing"]["torch_threads"] == "1"
        assert Path(seed["run_dir"]) == tmp_path / "runs" / name / "seed0"
    assert len(table["targets_per_seed"]) == 1 and len(table["targets_on_seed_mean"]) == 3
    assert "| STARS (log-normal depth + penalty) | 0 |" in p.stdout

    metrics = tmp_path / "runs" / "collapse_stars" / "seed0" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    again = _run(tmp_path, [])
    assert again.returncode == 0, again.stderr[-3000:]
    assert metrics.stat().st_mtime_ns == before  # reused, not retrained

    mixed = _run(tmp_path, ["stars.lam=0.3"])
    assert mixed.returncode == 2
    assert mixed.stderr.strip().endswith("pass another --out (or remove that run)")
    assert "holds a run of another config" in mixed.stderr and "Traceback" not in mixed.stderr


def test_reproduce_collapse_family_and_extra_configs(tmp_path):
    """--family picks the paper-regime configs (training depth 9) and --extra adds a stability
    option's config, checked by the same targets as STARS; an unknown --extra is one line, exit 2."""
    fam = ["--family", "collapse_paper", "--extra", "collapse_paper_progressive"]
    p = _run(tmp_path, [], fam + ["--seeds", "0"])
    assert p.returncode == 0, p.stderr[-3000:]
    table = json.loads((tmp_path / "docs" / "collapse_paper_results.json").read_text())
    assert set(table["configs"]) == {"collapse_paper_fixed", "collapse_paper_lognormal", "collapse_paper_stars",
                                     "collapse_paper_progressive"}
    assert all(c["seeds"][0]["train_depth"] == 9 for c in table["configs"].values())
    keys = set(table["targets_on_seed_mean"])
    assert {"collapse_paper_stars_holds (>= 95% of peak from mean to 8x)",
            "collapse_paper_progressive_holds (>= 95% of peak from mean to 8x)",
            "collapse_paper_progressive_peak_ok (>= fixed peak - 2 points)"} <= keys
    saved = (tmp_path / "runs" / "collapse_paper_progressive" / "seed0" / "config.yaml").read_text()
    assert "progressive: 0.5" in saved
    assert "| collapse_paper_progressive | 0 |" in p.stdout

    bad = _run(tmp_path, [], ["--family", "collapse_paper", "--extra", "no_such_config"])
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "configs/no_such_config.yaml: no such config (--family/--extra name configs/<name>.yaml)")
