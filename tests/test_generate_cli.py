"""stars-generate and `stars-eval depth --exit` end to end on a small arithmetic checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from stars_scale.config import RunConfig, ModelConfig, DataConfig, save_config
from stars_scale.model.looped import LoopedLM
from stars_scale import checkpoint as ckpt


def write_run(root: Path, run: RunConfig, seed: int = 0) -> Path:
    """A training run directory with one checkpoint of an (untrained) model."""
    torch.manual_seed(seed)
    model = LoopedLM(run.model)
    root.mkdir(parents=True, exist_ok=True)
    save_config(run, root / "config.yaml")

    def write(d: Path) -> None:
        ckpt.save_tensor_file(model.state_dict(), d / "model.pt")
        save_config(run, d / "config.yaml")

    ckpt.save_checkpoint(root, 3, write, {"step": 3}, keep_last=1)
    return root


def arith_run() -> RunConfig:
    run = RunConfig(model=ModelConfig(vocab_size=15, hidden=32, heads=2, mlp_hidden=64, max_seq_len=16, n_prelude=1,
                                      n_coda=1, injection="add", init_std=0.2),
                    data=DataConfig(digits=3, test_size=64))
    run.eval.samples = 24
    run.tracking.mlflow = False
    return run


def cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def test_generate_cli_arithmetic_prompts_json_and_errors(tmp_path):
    write_run(tmp_path / "run", arith_run())
    (tmp_path / "p.txt").write_text("123+456=\n\n001+002=\n")
    res = cli("stars_scale.cli.generate", "--checkpoint", "run", "--prompts", "p.txt", "--exit", "delta",
              "--tol", "1e-2", "--max-depth", "6", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["123+456=", "001+002="]
    for r in rows:
        assert len(r["loops"]) >= len(r["tokens"]) and all(1 <= n <= 6 for n in r["loops"])
        assert set(r["completion"]) <= set("0123456789+= ?<pad>")  # decoded with the task's vocabulary
        assert len(r["tokens"]) <= 16 - 8 + 1
    res = cli("stars_scale.cli.generate", "--checkpoint", "run/checkpoints/step_00000003", "--prompt", "12+3=",
              "--depth", "2", "--max-new-tokens", "3", cwd=tmp_path)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 1, res.stderr



def test_generate_cli_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from stars_scale.cli.generate import main

    write_run(tmp_path / "run", arith_run())
    monkeypatch.chdir(tmp_path)
    for args, msg in [
        (["--prompt", "12*3="], "not in the arithmetic vocabulary"),
        (["--prompt", "1+1=", "--exit", "kl"], "--exit kl: needs --tol"),
        (["--prompt", "1+1=", "--depth", "2", "--exit", "delta", "--tol", "1"], "exclusive"),
        (["--prompt", "1+1=", "--max-new-tokens", "40"], "--max-new-tokens: 40 does not fit"),
        (["--prompts", "nope.txt"], "--prompts nope.txt: cannot read"),
    ]:
        assert main(["--checkpoint", "run", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, (args, err)
    assert main(["--checkpoint", "missing", "--prompt", "1+1="]) == 2
    assert "missing" in capsys.readouterr().err


def test_eval_depth_exit_rules_table_plot_and_json(tmp_path):
    write_run(tmp_path / "run", arith_run())
    res = cli("stars_scale.cli.eval", "depth", "--checkpoint", "run", "--depths", "1,2,4", "--out", "ev",
              "--exit", "all", "--tol", "delta=0.05,delta=0.2,kl=1e-3,contraction=0.05,confidence=0.5", "--max-depth", "8",
              "--exit-rho-iters", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "ev" / "depth_scaling.json").read_text())
    rows = out["exit_rules"]
    assert [(r["rule"], r["tol"]) for r in rows] == [("delta", 0.05), ("delta", 0.2), ("kl", 1e-3),
                                                     ("contraction", 0.05), ("confidence", 0.5)]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 1 <= r["mean_loops"] <= r["p99_loops"] <= r["max_loops"] <= 8
        assert r["tokens"] >= 24  # every test prompt generated at least one token
    assert rows[0]["mean_loops"] >= rows[1]["mean_loops"]  # a looser tolerance never loops more
    assert rows[2]["probe_evals"] > 0 and rows[3]["probe_evals"] > 0 and rows[4]["probe_evals"] > 0
    assert (tmp_path / "ev" / "test_time.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "ev" / "test_time.md").read_text()
    assert "| fixed r=4 |" in table and "| contraction tol=0.05 |" in table and "| confidence tol=0.5 |" in table
    assert out["oracle_exit"]["accuracy"] >= max(out["accuracy"]) and "by_group" not in rows[0]
    assert "| oracle: each problem at its first right depth |" in table and "Per group" not in table
    res = cli("stars_scale.cli.eval", "depth", "--checkpoint", "run", "--depths", "1", "--exit", "delta",
              "--tol", "kl=1", cwd=tmp_path)
    assert res.returncode == 2 and "names rule 'kl'" in res.stderr
