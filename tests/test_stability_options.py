"""The STARS stability options (issue 23), checked against their definitions on a tiny model in
float64:

- `stars.progressive: α` (Bansal et al. 2022's progressive loss) is computed in one pass; its
  gradient must equal the two-pass definition (1 − α)·∇CE(s_r) + α·∇CE(s_r from a no-grad start
  at n), with the same n, while the forward values are those of the plain step bit for bit;
- `stars.probe_beyond: k` takes the penalty at s_{r+k}, the end state run k more iterations
  without gradient, and its gradient reaches the core's weights as a penalty at that state does;
- both are range-checked and refused (one line) where the pipeline/TP loop would not run them.

Tolerances: float64 sums of a few thousand products of O(1) terms, reordered (the scaled path
multiplies before accumulating): relative error ~ n·eps64 ≈ 1e-12, checked at 1e-9 of the
gradient's scale; the two terms of the mix differ by far more (asserted), so the check has power.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from stars_scale.config import ModelConfig, StarsConfig, load_config
from stars_scale.data.arithmetic import ArithmeticTask
from stars_scale.errors import ConfigError
from stars_scale.loss import token_ce
from stars_scale.model import LoopedLM
from stars_scale.parallel.layout import layout_problems
from stars_scale.stars.depth import Depth
from stars_scale.stars.objective import Objective, estimator_generator, forward_backward, progressive_start
from stars_scale.stars.regularizer import core_map_penalty

R = 6  # sampled depth


def model_and_batch(injection: str = "add"):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=15, hidden=32, heads=2, max_seq_len=16, mlp_hidden=64, n_prelude=1,
                      injection=injection, kernels="torch")
    return LoopedLM(cfg).double(), ArithmeticTask(3, seed=0, test_size=16).train_batch(0, 0, 8)


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def ce_grads(model, batch, n_free: int, n_grad: int) -> tuple[torch.Tensor, dict]:
    out = model(batch["input_ids"], n_free=n_free, n_grad=n_grad)
    ce = token_ce(out.logits, batch["labels"], kernels_mode="torch")
    ce.backward()
    return out.logits.detach(), grads(model)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("injection", ["add", "none"])
def test_progressive_loss_in_one_pass_equals_the_two_pass_definition(alpha, injection):
    model, batch = model_and_batch(injection)
    seed, step, micro = 3, 11, 1
    n = progressive_start(seed, step, micro, R)
    assert 0 < n < R  # this draw exercises the split (not a degenerate end)
    logits_full, g_full = ce_grads(model, batch, 0, R)
    _, g_trunc = ce_grads(model, batch, n, R - n)
    stars = StarsConfig(lam=0.0, estimate_every=0, progressive=alpha)
    r = forward_backward(model, batch, Depth(0, R), stars, step=step, micro=micro, seed=seed, loss_scale=1.0)
    g_prog = grads(model)
    # the forward is the plain step's, bit for bit
    out = model(batch["input_ids"], n_free=0, n_grad=R, grad_scale=(n, 1.0 - alpha))
    assert torch.equal(out.logits.detach(), logits_full)
    assert r.ce == pytest.approx(float(token_ce(logits_full, batch["labels"], kernels_mode="torch")), rel=1e-12)
    scale = max(float(g.abs().max()) for g in g_full.values())
    apart = max(float((g_full[k] - g_trunc[k]).abs().max()) for k in g_full)
    assert apart > 1e-3 * scale  # the two terms differ: the comparison below can fail
    for k in g_full:
        want = (1.0 - alpha) * g_full[k] + alpha * g_trunc[k]
        assert torch.allclose(g_prog[k], want, rtol=0, atol=1e-9 * scale), k


def test_progressive_start_is_uniform_over_the_earlier_depths_and_reproducible():
    draws = [progressive_start(0, step, 0, R) for step in range(3000)]
    assert set(draws) == set(range(R))
    counts = [draws.count(i) for i in range(R)]
    assert min(counts) > 3000 / R * 0.8  # 500 expected each; 0.8 is > 4 sigma below
    assert draws == [progressive_start(0, step, 0, R) for step in range(3000)]
    assert progressive_start(0, 5, 0, 1) == 0


def test_grad_scale_at_truncation_boundary_or_beyond_changes_nothing():
    model, batch = model_and_batch()
    _, g_plain = ce_grads(model, batch, 2, R - 2)
    for at in (0, 1, 2, R):  # at or before the no-grad part, or at the end: no gradient is rescaled
        out = model(batch["input_ids"], n_free=2, n_grad=R - 2, grad_scale=(at, 0.25))
        token_ce(out.logits, batch["labels"], kernels_mode="torch").backward()
        g = grads(model)
        if at in (0, 1):
            for k in g:
                assert torch.equal(g[k], g_plain[k]), (at, k)
    out = model(batch["input_ids"], n_free=2, n_grad=R - 2, grad_scale=(R, 0.25))
    assert out.logits.shape[-1] == 15


def test_probe_beyond_takes_the_penalty_k_iterations_past_the_sampled_depth():
    model, batch = model_and_batch()
    k = 5
    stars = StarsConfig(lam=0.1, probe_beyond=k, warmup_steps=0)
    out = model(batch["input_ids"], n_free=0, n_grad=1)  # one iteration: s_1 is far from s_6
    objective = Objective(stars, step=0, kernels="torch")
    est = objective.estimate(model, out.state, out.embedded, estimator_generator(0, 0, 0))
    est.penalty.backward()
    g_obj = grads(model)
    # by hand: k more iterations of the core map from s_r, without gradient, then the estimate there
    with torch.no_grad():
        h = out.state.detach()
        for _ in range(k):
            h = model.core_step(h, out.embedded.detach())
    by_hand = core_map_penalty(model, h, out.embedded, stars, create_graph=True, generator=estimator_generator(0, 0, 0))
    by_hand.penalty.backward()
    g_hand = grads(model)
    at_end = core_map_penalty(model, out.state, out.embedded, stars, create_graph=True,
                              generator=estimator_generator(0, 0, 0))
    grads(model)
    p_obj, p_hand, p_end = (float(x.penalty.detach()) for x in (est, by_hand, at_end))
    assert p_obj == pytest.approx(p_hand, rel=1e-12)
    # a different state: at init the map's Jacobian varies little with the state (measured: 6e-5 relative
    # between s_1 and s_6), but far above float64 rounding (~1e-14) and the agreement above
    assert abs(p_obj - p_end) > 1e-7 * p_end
    core = [n for n in g_obj if n.startswith("core.")]
    assert core and any(float(g_obj[n].abs().max()) > 0 for n in core)
    for n in g_obj:
        assert torch.allclose(g_obj[n], g_hand[n], rtol=0, atol=1e-12 * (1 + float(g_hand[n].abs().max()))), n
        if not n.startswith("core."):
            assert float(g_obj[n].abs().max()) == 0.0, n  # the state and e are detached: nothing upstream


def test_stability_options_are_range_checked(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 0\n")
    for bad, field in (("stars.progressive=1.5", "stars.progressive"), ("stars.progressive=-0.1", "stars.progressive"),
                       ("stars.probe_beyond=-1", "stars.probe_beyond")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(cfg, [bad])
    assert load_config(cfg, ["stars.probe_beyond=0", "stars.progressive=1.0"]).stars.progressive == 1.0


@pytest.mark.parametrize("option", ["stars.probe_beyond=4", "stars.progressive=0.5"])
def test_stability_options_refused_under_pipeline_and_tensor_parallelism(tmp_path, option):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 0\nmodel: {n_core: 2}\nstars: {method: fd, lam: 0.1}\n")
    name = option.split("=")[0]
    for tp, pp in ((1, 2), (2, 1)):
        problems = layout_problems(load_config(cfg, [option]), world=2, tp=tp, pp=pp)
        assert any(p.startswith(name) and "one process" in p for p in problems), problems
    assert layout_problems(load_config(cfg, [option]), world=2, tp=1, pp=1) == []


def test_stars_train_runs_both_options_end_to_end(tmp_path):
    """The console script with both options: the penalty is on (taken past the sampled depth), the
    metrics log it, and the run's recorded config carries the options."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    cfg = {"seed": 0, "model": {"vocab_size": 15, "hidden": 32, "heads": 2, "max_seq_len": 16, "mlp_hidden": 64},
           "depth": {"dist": "lognormal", "mu": 1.0, "sigma": 0.5, "max": 6},
           "stars": {"lam": 0.1, "warmup_steps": 2, "probe_beyond": 3, "progressive": 0.5},
           "data": {"digits": 2, "batch_size": 16, "test_size": 32},
           "train": {"steps": 4, "eval_every": 0, "checkpointing": "none", "progress": False},
           "eval": {"depths": [1, 2], "samples": 32, "rho_iters": 2}, "tracking": {"mlflow": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "stars_scale.cli.train", "--config", "c.yaml", "--out", "run"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    on = [r for r in rows if r.get("step", 0) >= 3]  # logged step 3 = step index 2 = stars.warmup_steps
    assert len(on) == 2 and all(r["penalty"] > 0 for r in on)
    for r in on:  # (1 - lam) CE + lam P, P the penalty past the sampled depth
        assert r["loss"] == pytest.approx(0.9 * r["ce"] + 0.1 * r["penalty"], rel=1e-5)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["stars"]["probe_beyond"] == 3 and saved["stars"]["progressive"] == 0.5


def test_penalty_gate_opens_once_the_mean_ce_of_the_window_is_low_enough():
    from stars_scale.stars.objective import PenaltyGate

    w = PenaltyGate.WINDOW
    stars = StarsConfig(lam=0.1, warmup_steps=w + 5, warmup_ce=0.52)
    gate = PenaltyGate(stars)
    assert gate.config().warmup_steps == PenaltyGate.NEVER
    ces = [0.9] * w + [0.1] * (2 * w)
    opened = [step for step, ce in enumerate(ces, start=1) if gate.update(step, ce)]
    # by hand: after k low steps the window's mean is (0.9 (50 - k) + 0.1 k) / 50 = 0.9 - 0.016 k,
    # first <= 0.52 at k = 24 (0.516; k = 23 gives 0.532), i.e. after step 50 + 24
    want = w + 24
    assert opened == [want] and gate.config().warmup_steps == want
    assert not gate.update(want + 1, 5.0) and gate.opened_at == want  # once on, it stays on
    again = PenaltyGate(stars)
    again.load_state_dict(json.loads(json.dumps(gate.state_dict())))
    assert again.opened_at == want and again.config() == gate.config()
    # past warmup_steps only; non-finite CE values are not counted
    early = PenaltyGate(dataclasses.replace(stars, warmup_ce=10.0))
    assert [s for s in range(1, w + 10) if early.update(s, float("nan") if s == 3 else 0.1)] == [w + 5]
    plain = StarsConfig(lam=0.1, warmup_steps=7)
    assert PenaltyGate(plain).config() is plain and not PenaltyGate(plain).update(100, 0.0)


def _train(tmp_path, name: str, stars: dict, steps: int, *extra: str):
    import os
    import subprocess
    import sys

    import yaml

    cfg = {"seed": 0, "model": {"vocab_size": 15, "hidden": 16, "heads": 2, "max_seq_len": 16, "mlp_hidden": 32},
           "depth": {"dist": "fixed", "value": 2}, "stars": {"lam": 0.1, "estimate_every": 1, **stars},
           "data": {"digits": 2, "batch_size": 8, "test_size": 16},
           "train": {"steps": steps, "eval_every": 0, "ckpt_every": 0, "checkpointing": "none", "progress": False},
           "eval": {"depths": [1, 2], "samples": 16, "rho_iters": 2}, "tracking": {"mlflow": False}}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "stars_scale.cli.train", "--config", f"{name}.yaml", "--out", name,
                          *extra], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], res.stderr


def _in_loss(r: dict) -> bool:
    return r["loss"] != pytest.approx(r["ce"], rel=1e-9)


def test_warmup_ce_holds_the_penalty_until_the_window_and_survives_a_resume(tmp_path):
    """A threshold every CE passes: the penalty enters right after the first full window (step 51),
    not at warmup_steps (2); one no CE passes keeps it out. Stopped at step 30 and resumed, the run
    matches the uninterrupted one step for step (the gate's window is in the checkpoint)."""
    from stars_scale.stars.objective import PenaltyGate

    w = PenaltyGate.WINDOW
    rows, err = _train(tmp_path, "open", {"warmup_steps": 2, "warmup_ce": 1e9}, w + 6)
    assert [r["step"] for r in rows if _in_loss(r)] == list(range(w + 1, w + 7))
    assert f"step {w}: the STARS penalty enters the loss" in err
    never, _ = _train(tmp_path, "never", {"warmup_steps": 2, "warmup_ce": 1e-9}, w + 6)
    assert not any(_in_loss(r) for r in never) and all(r["penalty"] > 0 for r in never)

    _train(tmp_path, "cut", {"warmup_steps": 2, "warmup_ce": 1e9}, w + 6, "--stop-after-steps", "30")
    resumed, _ = _train(tmp_path, "cut", {"warmup_steps": 2, "warmup_ce": 1e9}, w + 6, "--resume")
    assert [r["step"] for r in resumed][-w - 6:] == [r["step"] for r in rows]
    for a, b in zip(resumed[-w - 6:], rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]
