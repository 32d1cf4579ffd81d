"""stars-train on webdataset shards: text and arithmetic through one loader, exact resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from data_helpers import make_dataset, stars_data


def train(cwd: Path, cfg: Path, out: str, *extra: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "stars_scale.cli.train", "--config", str(cfg), "--out", out, *extra],
                         cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in (cwd / out / "metrics.jsonl").read_text().splitlines()]


def config(tmp: Path, data: dict, vocab: int, seq: int) -> Path:
    cfg = {"model": {"vocab_size": vocab, "hidden": 32, "heads": 2, "max_seq_len": seq, "mlp_hidden": 64,
                     "positions": "rope", "norm_placement": "pre"},
           "depth": {"dist": "lognormal", "mu": 0.7, "sigma": 0.5, "max": 4},
           "stars": {"lam": 0.1, "method": "fd", "warmup_steps": 2},
           "data": {"kind": "shards", "batch_size": 4, **data},
           "train": {"steps": 8, "progress": False, "eval_every": 4},
           "eval": {"depths": [1, 2, 4]}, "tracking": {"mlflow": False}}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_text_shards_train_eval_and_resume_exactly(tmp_path):
    data = make_dataset(tmp_path, n_docs=80, seq_len=16, blocks_per_shard=6, val_fraction=0.2)
    manifest = json.loads((Path(data) / "manifest.json").read_text())
    cfg = config(tmp_path, {"path": str(data), "num_workers": 2, "val_batches": 2},
                 manifest["vocab_size"], manifest["seq_len"])
    full = train(tmp_path, cfg, "full")
    first = train(tmp_path, cfg, "split", "--stop-after-steps", "3")
    assert len(first) == 3
    split = train(tmp_path, cfg, "split", "--resume")
    assert [r["step"] for r in split] == list(range(1, 9))
    for a, b in zip(full, split):
        for key in ("loss", "ce", "rho", "depth", "tokens"):
            assert a[key] == b[key], (a["step"], key)
    assert full[-1]["tokens"] == 8 * 4 * manifest["seq_len"]
    assert "val_loss" in full[3] and "val_acc" not in full[3]
    ds = json.loads((tmp_path / "full" / "depth_scaling.json").read_text())
    assert ds["accuracy"] is None and len(ds["loss"]) == 3 and len(ds["perplexity"]) == 3


def test_arithmetic_shards_give_accuracy(tmp_path):
    res = stars_data("arithmetic", "--digits", "2", "--samples", "256", "--test-size", "32",
                     "--blocks-per-shard", "32", "--out", str(tmp_path / "arith"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cfg = config(tmp_path, {"path": str(tmp_path / "arith"), "val_batches": 8}, 15, 16)
    rows = train(tmp_path, cfg, "run")
    assert len(rows) == 8 and all(r["loss"] > 0 for r in rows)
    assert 0.0 <= rows[3]["val_acc"] <= 1.0
    ds = json.loads((tmp_path / "run" / "depth_scaling.json").read_text())
    assert len(ds["accuracy"]) == 3


def test_resume_refuses_a_different_data_layout(tmp_path):
    data = make_dataset(tmp_path, n_docs=80, seq_len=16, blocks_per_shard=6, val_fraction=0.2)
    manifest = json.loads((Path(data) / "manifest.json").read_text())
    cfg = config(tmp_path, {"path": str(data), "num_workers": 2}, manifest["vocab_size"], manifest["seq_len"])
    train(tmp_path, cfg, "r", "--stop-after-steps", "2")
    res = subprocess.run([sys.executable, "-m", "stars_scale.cli.train", "--config", str(cfg), "--out", "r", "--resume",
                          "--set", "data.num_workers=1"], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "worker" in res.stderr
