"""Depth sampler: reproducible across processes, distributions match their formulas."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from stars_scale.config import CurriculumConfig, DepthConfig, ModelConfig
from stars_scale.model import LoopedLM
from stars_scale.stars.depth import DepthSampler, base_mean

SNIPPET = """
import json
from stars_scale.config import DepthConfig
from stars_scale.stars.depth import DepthSampler
s = DepthSampler(DepthConfig(dist='poisson-lognormal', mean=8, sigma=0.5, backprop=3, max=64), seed=11)
print(json.dumps([[d.n_free, d.n_grad] for d in map(s.sample, range(200))]))
"""


def test_same_seed_and_step_give_same_depth_in_two_processes():
    outs = [subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert outs[0] == outs[1]
    here = DepthSampler(DepthConfig(dist="poisson-lognormal", mean=8, sigma=0.5, backprop=3, max=64), seed=11)
    assert json.loads(outs[0]) == [[d.n_free, d.n_grad] for d in map(here.sample, range(200))]


def draws(cfg, n=20000, seed=0):
    s = DepthSampler(cfg, seed)
    return np.array([s.total_depth(i) for i in range(n)])


def test_lognormal_median_and_mean():
    cfg = DepthConfig(dist="lognormal", mu=2.0, sigma=0.5, min=1, max=1000)
    r = draws(cfg)
    assert np.median(r) == round(math.exp(2.0))  # median of LogNormal is e^mu; rounding keeps it
    assert abs(r.mean() - base_mean(cfg)) / base_mean(cfg) < 0.02


def test_lognormal_is_clipped():
    r = draws(DepthConfig(dist="lognormal", mu=2.0, sigma=0.7, min=3, max=10))
    assert r.min() == 3 and r.max() == 10


def test_poisson_lognormal_mean_is_mean_plus_one():
    cfg = DepthConfig(dist="poisson-lognormal", mean=32, sigma=0.5, min=1, max=10_000)
    r = draws(cfg)
    assert abs(r.mean() - 33) / 33 < 0.02
    assert r.min() >= 1


def test_uniform_and_fixed():
    r = draws(DepthConfig(dist="uniform", min=2, max=6))
    assert set(np.unique(r)) == {2, 3, 4, 5, 6}
    assert abs(r.mean() - 4) < 0.05
    assert set(draws(DepthConfig(dist="fixed", value=7), n=50)) == {7}


@pytest.mark.parametrize("shape", ["linear", "sqrt"])
def test_curriculum_ramps_the_mean(shape):
    cfg = DepthConfig(dist="poisson-lognormal", mean=16, sigma=0.5, max=1000,
                      curriculum=CurriculumConfig(steps=1000, start=2.0, shape=shape))
    s = DepthSampler(cfg, 0)
    assert s.mean_at(0) == pytest.approx(2.0)
    assert s.mean_at(1000) == pytest.approx(17.0)
    half = s.mean_at(500)
    expect = 2 + 15 * (0.5 if shape == "linear" else 1 - math.sqrt(0.5))
    assert half == pytest.approx(expect)
    early = np.mean([s.total_depth(i) for i in range(0, 50)])
    late = np.mean([s.total_depth(i) for i in range(2000, 2050)])
    assert early < 5 < 12 < late


def test_truncated_bptt_split():
    s = DepthSampler(DepthConfig(dist="fixed", value=10, backprop=4), 0)
    d = s.sample(0)
    assert (d.n_free, d.n_grad) == (6, 4)
    s = DepthSampler(DepthConfig(dist="fixed", value=3, backprop=4), 0)
    assert (s.sample(0).n_free, s.sample(0).n_grad) == (0, 3)


def test_truncated_bptt_leaves_no_gradient_through_free_iterations():
    torch.manual_seed(0)
    model = LoopedLM(ModelConfig(vocab_size=15, hidden=16, heads=2, max_seq_len=8, mlp_hidden=32,
                                 injection="add", init_state="random", n_prelude=1))
    ids = torch.randint(0, 15, (2, 6))
    states = []
    e = model.encode(ids)
    s0 = model.init_state(e).requires_grad_(True)
    s = model.recur(s0, e, n_free=3, n_grad=2, states=states)
    s.sum().backward()
    assert s0.grad is None  # the free iterations are cut from the graph
    assert len(states) == 5
    # the prelude still gets gradient through e in the grad iterations
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prelude.parameters())
    # and with zero free iterations the initial state does get gradient
    s0b = model.init_state(e.detach()).requires_grad_(True)
    model.recur(s0b, e.detach(), n_free=0, n_grad=2).sum().backward()
    assert s0b.grad is not None and s0b.grad.abs().sum() > 0
