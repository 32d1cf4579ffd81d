"""stars-plan: parameter counts against instantiated models, memory against a measured CPU step.

Measurement method (docs/plan.md): parameters, gradients and AdamW state are counted exactly
from a real CPU step's tensors. Activations are the bytes autograd saves for backward, measured
with `torch.autograd.graph.saved_tensors_hooks` (unique storages, parameters excluded) around
the forward and loss. With checkpointing the hook cannot see inside the checkpointed regions,
so the measured peak is assembled from measured parts: what the hook sees outside them, the
tensors handed to `checkpoint` (recorded by wrapping it), and the saved bytes of one
recomputed piece (the hook on one un-checkpointed iteration, or block).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import stars_scale.model.looped as looped
from stars_scale.cli.plan import main as plan_main
from stars_scale.config import ModelConfig, RunConfig, config_from_dict
from stars_scale.model.looped import LoopedLM
from stars_scale.plan import (activation_bytes, depth_stats, flops_per_token, param_counts, plan,
                              stage_param_elems, stage_shapes, state_bytes)

BASE = dict(vocab_size=96, hidden=64, heads=4, max_seq_len=32, n_prelude=1, n_core=2, n_coda=1,
            injection="concat-linear", init_state="random", mlp="swiglu", norm="rmsnorm",
            positions="rope", norm_placement="sandwich")

VARIANTS = [
    {}, dict(norm_placement="pre"), dict(norm_placement="post"), dict(norm_placement="peri"),
    dict(norm="layernorm"), dict(norm="layernorm", bias=False), dict(mlp="gelu", mlp_hidden=100),
    dict(kv_heads=2), dict(positions="learned"), dict(qk_norm=True), dict(injection="add"),
    dict(injection="none", init_state="embed"), dict(state_norm=True, final_norm=False),
    dict(pre_coda_norm=True), dict(bias=False, qkv_bias="qk"), dict(bias=False, qkv_bias="qkv"),
    dict(tie_embeddings=False, exit_gate=True), dict(n_prelude=0, n_coda=0, n_core=3),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "base")
def test_param_counts_match_instantiated_model(variant):
    cfg = ModelConfig(**{**BASE, **variant})
    model = LoopedLM(cfg)
    counts = param_counts(cfg)
    assert counts.as_dict() == model.param_groups_counts()
    assert counts.total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("pp", [1, 2, 3])
@pytest.mark.parametrize("tie", [True, False])
def test_pipeline_stages_partition_the_parameters(pp, tie):
    cfg = ModelConfig(**{**BASE, "n_core": 3, "tie_embeddings": tie})
    counts = param_counts(cfg)
    total = sum(stage_param_elems(cfg, counts, st, tp=1) for st in stage_shapes(cfg, pp))
    assert total == counts.total  # a tied head keeps no copy on the last stage (it receives the weight)
    assert [st.core for st in stage_shapes(cfg, pp)] == {1: [3], 2: [2, 1], 3: [1, 1, 1]}[pp]


# ------------------------------------------------------------------ measured memory


def saved_storages(model: torch.nn.Module, fn) -> dict[int, int]:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


def measured_activation_bytes(model: LoopedLM, ids, targets, n_free: int, n_grad: int, mode: str,
                              monkeypatch) -> int:
    held: dict[int, int] = {}
    real = looped.checkpoint

    def recording_checkpoint(fn, *args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                held[a.untyped_storage().data_ptr()] = a.untyped_storage().nbytes()
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(looped, "checkpoint", recording_checkpoint)
    model.checkpointing = mode
    loss = {}

    def step():
        loss["v"] = F.cross_entropy(model(ids, n_free=n_free, n_grad=n_grad).logits.flatten(0, 1), targets)

    outer = saved_storages(model, step)
    loss["v"].backward()  # the step runs to completion through the recorded checkpoints
    if mode == "none":
        return sum(outer.values())
    model.checkpointing = "none"
    with torch.no_grad():
        e = model.encode(ids)
        s = model.init_state(e)
    s, e = s.requires_grad_(), e.requires_grad_()
    piece = (lambda: model.core_step(s, e)) if mode == "loop" else (lambda: model.core[0](s, model.rope()))
    recompute = saved_storages(model, piece)
    return sum(b for p, b in outer.items() if p not in held) + sum(held.values()) + sum(recompute.values())


@pytest.mark.parametrize("variant", [{}, dict(norm_placement="pre", kv_heads=2, mlp="gelu"),
                                     dict(norm_placement="peri", state_norm=True, final_norm=False,
                                          injection="none", init_state="embed", n_prelude=0,
                                          n_core=3, n_coda=0)],
                         ids=["sandwich", "pre-gqa-gelu", "ouro-like"])
@pytest.mark.parametrize("mode", ["none", "loop", "block"])
def test_memory_within_10_percent_of_a_measured_cpu_step(variant, mode, monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, **variant})
    model = LoopedLM(cfg).train()
    B, T, n_free, n_grad = 4, 32, 2, 3
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    targets = torch.randint(0, cfg.vocab_size, (B * T,))

    act = measured_activation_bytes(model, ids, targets, n_free, n_grad, mode, monkeypatch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    optim = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if isinstance(t, torch.Tensor))

    pred_state = state_bytes(param_counts(cfg).total, "fp32", zero=0, dp=1)
    pred_act = activation_bytes(cfg, B, T, n_grad, mode, "fp32").total
    assert abs(pred_state.weights - params) / params < 0.10
    assert abs(pred_state.grads - grads) / grads < 0.10
    assert abs(pred_state.optim - optim) / optim < 0.10
    assert abs(pred_act - act) / act < 0.10, (pred_act, act)
    measured_peak = params + grads + optim + act
    assert abs(pred_state.total + pred_act - measured_peak) / measured_peak < 0.10


def test_checkpointing_orders_activation_memory():
    cfg = ModelConfig(**BASE)
    none, loop, block = (activation_bytes(cfg, 4, 32, 8, m, "fp32").total for m in ("none", "loop", "block"))
    assert block < loop < none
    # without checkpointing memory grows with the gradient-carrying depth; with it barely
    assert activation_bytes(cfg, 4, 32, 16, "none").total > 1.8 * none
    assert activation_bytes(cfg, 4, 32, 16, "loop").total < 1.1 * loop


# ------------------------------------------------------------------ depth, FLOPs, layouts


def run_config(**sections) -> RunConfig:
    data = {"model": {**BASE, **sections.pop("model", {})}, **sections}
    return config_from_dict(data)


def test_flops_per_token_follow_the_formula():
    run = run_config(depth={"dist": "fixed", "value": 6, "backprop": 2})
    ds = depth_stats(run, draws=50)
    assert (ds.mean_total, ds.mean_grad, ds.mean_free, ds.p99_total, ds.p99_grad) == (6, 2, 4, 6, 2)
    m, c = run.model, param_counts(run.model)
    f = flops_per_token(m, c, 32, ds)
    n_outer = c.prelude + c.coda + c.vocab_matrix
    assert f.outer == 6 * n_outer
    assert f.core_grad == 6 * 2 * c.core and f.core_free == 2 * 4 * c.core
    assert f.attention == 12 * 64 * 32 * (2 + 2 * 2) + 4 * 64 * 32 * 4 * 2
    assert f.total == f.outer + f.core_grad + f.core_free + f.attention


def test_depth_stats_use_the_sampler_quantiles():
    run = run_config(depth={"dist": "poisson-lognormal", "mean": 32, "sigma": 0.5, "backprop": 8, "max": 256})
    ds = depth_stats(run, draws=4000)
    assert 31 < ds.mean_total < 35  # Poisson(LogNormal(mean 32)) + 1
    assert ds.p99_total > 2 * ds.p50_total and ds.p99_grad == 8
    assert ds.mean_grad == pytest.approx(ds.mean_total - ds.mean_free)


def test_plan_reports_fit_and_why_not():
    run = run_config(model={"hidden": 256, "heads": 8, "n_core": 4, "vocab_size": 32000, "max_seq_len": 1024},
                     depth={"dist": "fixed", "value": 8}, data={"batch_size": 8},
                     parallel={"tp": 1, "pp": 1, "zero": 0})
    p = plan(run, nodes=1, gpus_per_node=2, gpu="h100", draws=10)
    cl = p.config_layout()
    assert cl is not None and cl.valid and cl.dp == 2 and cl.fits
    # a GPU far too small: every layout fails, and the reason names the largest part
    p_small = plan(run, nodes=1, gpus_per_node=2, gpu="h100", usable_fraction=0.01, draws=10)
    assert not any(lp.fits for lp in p_small.layouts)
    assert "usable" in p_small.config_layout().reasons[0] and "largest" in p_small.config_layout().reasons[0]
    # invalid layouts say why: heads 8 are not divisible by tp 16? (only tp up to gpus/node is tried)
    p8 = plan(dataclasses.replace(run, model=dataclasses.replace(run.model, heads=4, kv_heads=None)),
              nodes=1, gpus_per_node=8, draws=10)
    bad = [lp for lp in p8.layouts if lp.tp == 8]
    assert bad and all(not lp.valid and "model.heads=4 is not divisible by parallel.tp=8" in lp.reasons[0]
                       for lp in bad)
    assert all(lp.pp <= run.model.n_core for lp in p8.layouts)


def test_plan_throughput_and_days():
    run = run_config(depth={"dist": "fixed", "value": 4}, train={"dtype": "bf16"})
    p = plan(run, nodes=2, gpus_per_node=4, gpu="a100", mfu=0.5, tokens=1e9, draws=10, seq=16)
    expected = 0.5 * 312e12 * 8 / p.flops.total  # A100 bf16 dense peak, 8 GPUs
    assert p.tokens_per_s() == pytest.approx(expected)
    assert p.days() == pytest.approx(1e9 / expected / 86400)


def test_plan_cli(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {hidden: 64, heads: 4, n_core: 2, vocab_size: 100, max_seq_len: 64}\n"
                   "depth: {dist: fixed, value: 4}\nparallel: {tp: 2, pp: 1, zero: 1}\nstars: {method: fd}\n")
    assert plan_main(["--config", str(cfg), "--nodes", "1", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "config layout tp=2 pp=1 zero=1 (dp=2): fits" in out and "FLOPs/token" in out
    assert plan_main(["--config", str(cfg), "--nodes", "1", "--gpus-per-node", "4", "--json"]) == 0
    assert '"tokens_per_s"' in capsys.readouterr().out
    # bad input: one line, exit 2
    assert plan_main(["--config", str(cfg), "--nodes", "0", "--gpus-per-node", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--nodes" in err[0]
    assert plan_main(["--config", str(tmp_path / "missing.yaml"), "--nodes", "1", "--gpus-per-node", "1"]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert plan_main(["--config", str(cfg), "--nodes", "1", "--gpus-per-node", "1", "--seq-len", "999"]) == 2
    assert "max_seq_len" in capsys.readouterr().err
