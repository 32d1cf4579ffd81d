"""lm-evaluation-harness: the `stars` model class and `stars-eval lm`, on local tasks only.

The tasks are YAMLs in tests/data/lm_tasks with `dataset_path: json` over a jsonl shipped there;
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE make any attempt to reach a hub fail the test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is in the dev/eval extras: pip install -e '.[dev]'")

from stars_scale.eval.lm_harness import StarsLM  # noqa: E402
from stars_scale.generate.load import arithmetic_codec  # noqa: E402
from stars_scale.model.looped import LoopedLM  # noqa: E402
from test_generate_cli import arith_run, write_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_tasks"


def req(*args):
    return SimpleNamespace(args=args)


@pytest.fixture(scope="module")
def lm_parts():
    run = arith_run()
    torch.manual_seed(0)
    return run, LoopedLM(run.model).eval(), arithmetic_codec()


def test_loglikelihood_is_the_forward_log_prob_under_fixed_depth_and_exit_rules(lm_parts):
    run, model, codec = lm_parts
    lm = StarsLM(model=model, run=run, codec=codec, depth=3)
    (lp, greedy), (lp2, _) = lm.loglikelihood([req("123+456=", " 9750"), req("1+1=", " 2")])
    ids = torch.tensor([codec.encode("123+456= 9750")])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1], n_free=3, n_grad=0).logits.float(), -1)[0]
    want = sum(float(logp[t - 1, ids[0, t]]) for t in range(8, 13))
    assert lp == pytest.approx(want, abs=1e-4)
    assert greedy == all(int(logp[t - 1].argmax()) == int(ids[0, t]) for t in range(8, 13))
    # an exit rule scores through the generator; with a rule that stops at t=1 it equals depth 1
    ex = StarsLM(model=model, run=run, codec=codec, exit="delta", tol=1e9, max_depth=8)
    one = StarsLM(model=model, run=run, codec=codec, depth=1)
    a, b = ex.loglikelihood([req("123+456=", " 9750")])[0], one.loglikelihood([req("123+456=", " 9750")])[0]
    assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1] and set(ex.loops) == {1}
    # rolling: the first token conditioned on EOS, the sum over the text
    roll = lm.loglikelihood_rolling([req("12+34= 64")])[0]
    assert roll == pytest.approx(lm.loglikelihood([req("", "12+34= 64")])[0][0], abs=1e-4)


def test_generate_until_stops_at_the_until_string_and_max_gen_toks(lm_parts):
    run, model, codec = lm_parts
    lm = StarsLM(model=model, run=run, codec=codec, depth=2)
    free = lm.generate_until([req("123+456=", {"max_gen_toks": 6})])[0]
    assert 0 < len(free) <= 6
    stop = free[2] if len(free) > 2 else free[-1]
    cut = lm.generate_until([req("123+456=", {"until": [stop], "max_gen_toks": 6})])[0]
    assert cut == free[: free.index(stop)]
    with pytest.raises(Exception, match="needs a tolerance"):
        StarsLM(model=model, run=run, codec=codec, exit="kl")


def test_stars_eval_lm_on_local_tasks_writes_depth_scaling(tmp_path):
    write_run(tmp_path / "run", arith_run())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "stars_scale.cli.eval", "lm", "--checkpoint", str(tmp_path / "run"),
           "--tasks", "stars_arith_gen,stars_arith_mc,stars_arith_ppl", "--depths", "1,3", "--limit", "5",
           "--include-path", str(TASKS), "--out", str(tmp_path / "ev")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    table = json.loads((tmp_path / "ev" / "lm_depth_scaling.json").read_text())
    assert table["depths"] == [1, 3] and table["limit"] == 5
    assert {t: e["metric"] for t, e in table["tasks"].items()} == {
        "stars_arith_gen": "exact_match", "stars_arith_mc": "acc", "stars_arith_ppl": "bits_per_byte"}
    ppl = table["tasks"]["stars_arith_ppl"]["scores"]
    assert all(0 < x < 10 for x in ppl) and ppl[0] != ppl[1]  # depth changes the model's scores
    assert table["mean_loops"] == [1.0, 3.0]
    assert (tmp_path / "ev" / "lm_depth_scaling.png").read_bytes()[:4] == b"\x89PNG"

    res = subprocess.run(cmd[:7] + ["nope_task", "--depths", "1", "--include-path", str(TASKS)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 2 and "nope_task" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
