"""Continued pretraining: a retrofitted Llama checkpoint trained further with a depth curriculum."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from stars_scale.config import DepthConfig, load_config
from stars_scale.convert import load_converted
from stars_scale.data.sources import build_task
from stars_scale.model.looped import LoopedLM
from stars_scale.stars.depth import DepthSampler


def run(args, cwd, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"{args}: {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def test_backprop_depth_follows_the_curriculum():
    cfg = DepthConfig(dist="fixed", value=16, backprop=8)
    cfg.curriculum.steps, cfg.curriculum.start, cfg.curriculum.backprop_start = 100, 2.0, 2
    s = DepthSampler(cfg, 0)
    assert s.sample(0).total == 2 and s.sample(0).n_grad == 2
    assert s.sample(50).total == 9 and s.sample(50).n_grad == 5
    assert s.sample(200).total == 16 and s.sample(200).n_grad == 8


def test_retrofit_then_train_from_converted_weights(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    run(["stars_scale.cli.convert", "import", "--from", "llama", str(tmp_path / "hf"), "--prelude", "0",
         "--core", "1-2", "--coda", "3", "--out", "conv"], tmp_path)
    overrides = ["init.from=conv", "data.digits=3", "data.batch_size=8", "data.test_size=32",
                 "depth.dist=poisson-lognormal", "depth.mean=4", "depth.backprop=3", "depth.max=8",
                 "depth.curriculum.steps=6", "depth.curriculum.start=1", "depth.curriculum.backprop_start=1",
                 "optim.schedule=wsd", "optim.lr=0.0003", "optim.warmup_steps=2",
                 "stars.lam=0.1", "stars.method=fd", "stars.warmup_steps=3",
                 "train.steps=6", "train.progress=false", "tracking.mlflow=false", "eval.depths=[]"]
    run(["stars_scale.cli.train", "--config", "conv/config.yaml", "--out", "run",
         *[x for o in overrides for x in ("--set", o)]], tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["depth"] == 1 and rows[0]["n_grad"] == 1  # curriculum starts shallow
    assert all(r["n_grad"] <= 3 for r in rows)
    # the penalty enters the loss only after its warm-up (rho is estimated and logged before too)
    assert [r["loss"] == r["ce"] for r in rows] == [True] * 3 + [False] * 3

    # step 1's CE is the converted model's CE on step 1's batch at step 1's depth: weights were loaded
    cfg = load_config(tmp_path / "conv" / "config.yaml", overrides)
    mcfg, sd = load_converted(tmp_path / "conv")
    model = LoopedLM(mcfg)
    model.load_state_dict(sd)
    batch = build_task(cfg).train_batch(0, 0, 8)
    depth = DepthSampler(cfg.depth, cfg.seed).sample(0)
    with torch.no_grad():
        logits = model(batch["input_ids"], depth.n_free, depth.n_grad).logits
    ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    assert abs(ce.item() - rows[0]["ce"]) < 1e-5

    # a model config that disagrees with the converted weights is refused, naming the field
    res = run(["stars_scale.cli.train", "--config", "conv/config.yaml", "--out", "bad", "--set", "init.from=conv",
               "--set", "model.hidden=64", "--set", "model.heads=4", "--set", "tracking.mlflow=false"],
              tmp_path, check=False)
    assert res.returncode == 2 and "model.hidden: run has 64" in res.stderr
