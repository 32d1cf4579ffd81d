"""Ouro (ByteDance `modeling_ouro.py`, model_type `ouro`).

Ouro loops its whole decoder stack `total_ut_steps` times without injection and normalises the
state after every loop with the one `model.norm`; logits read the last normalised state. Each
decoder layer puts a norm before *and after* both sublayers, outside the residual:

    x = x + input_layernorm_2(attn(input_layernorm(x)))
    x = x + post_attention_layernorm_2(mlp(post_attention_layernorm(x)))

In LoopedLM terms: no prelude or coda, all layers in the core, `norm_placement: peri`,
`injection: none`, `init_state: embed`, `state_norm: true` (the per-loop norm), `final_norm:
false`, rotate-half RoPE. `model.early_exit_gate` (Linear(h, 1) on each loop's normalised
state) becomes the optional `exit_gate` head.
"""
from __future__ import annotations

from typing import Any

import torch

from stars_scale.config import DepthConfig, ModelConfig, RunConfig
from stars_scale.convert.decoder_config import check_model_type, read_decoder_shape
from stars_scale.convert.hfdir import HFDir
from stars_scale.errors import UserError
from stars_scale.model.fused import fuse_state_dict, unfuse_state_dict
from stars_scale.stars.depth import median_depth

MODEL_TYPE = "ouro"
ARCH = "OuroForCausalLM"

# ours (per block) -> Ouro (per layer)
_BLOCK = {
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "norm1.weight": "input_layernorm.weight",
    "norm2.weight": "input_layernorm_2.weight",
    "norm3.weight": "post_attention_layernorm.weight",
    "norm4.weight": "post_attention_layernorm_2.weight",
}


def _block_shapes(d, ours: str) -> tuple[int, ...]:
    h, hd, kv, inter = d.hidden, d.head_dim, d.kv_heads, d.intermediate
    return {
        "attn.q_proj.weight": (d.heads * hd, h), "attn.k_proj.weight": (kv * hd, h),
        "attn.v_proj.weight": (kv * hd, h), "attn.o_proj.weight": (h, d.heads * hd),
        "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }.get(ours, (h,))


def import_ouro(src: HFDir) -> tuple[RunConfig, dict[str, torch.Tensor], dict[str, Any]]:
    check_model_type(src, {MODEL_TYPE: ARCH}, "ouro")
    d = read_decoder_shape(src)
    steps = src.cfg("total_ut_steps", 4, int)
    if steps < 1:
        raise UserError(f"{src.config_path}: total_ut_steps must be >= 1, got {steps}")
    gate = src.has("model.early_exit_gate.weight")
    model = ModelConfig(
        vocab_size=d.vocab, hidden=d.hidden, heads=d.heads,
        kv_heads=None if d.kv_heads == d.heads else d.kv_heads, mlp="swiglu",
        mlp_hidden=d.intermediate, norm="rmsnorm", norm_eps=d.eps, norm_placement="peri",
        positions="rope", rope_base=d.rope_theta, max_seq_len=d.max_pos,
        n_prelude=0, n_core=d.layers, n_coda=0, injection="none", init_state="embed",
        state_norm=True, final_norm=False, tie_embeddings=d.tie, embed_scale=1.0, bias=False,
        dropout=0.0, init_std=float(src.cfg("initializer_range", 0.02, (int, float))),
        exit_gate=gate,
    )
    run = RunConfig(model=model, depth=DepthConfig(dist="fixed", value=steps, min=1,
                                                   max=max(100, steps)))
    sd: dict[str, torch.Tensor] = {
        "embed.weight": src.get("model.embed_tokens.weight", (d.vocab, d.hidden)),
    }
    for i in range(d.layers):
        for ours, theirs in _BLOCK.items():
            sd[f"core.{i}.{ours}"] = src.get(f"model.layers.{i}.{theirs}", _block_shapes(d, ours))
    sd["state_norm.weight"] = src.get("model.norm.weight", (d.hidden,))
    if gate:
        sd["exit_gate.weight"] = src.get("model.early_exit_gate.weight", (1, d.hidden))
        sd["exit_gate.bias"] = src.get("model.early_exit_gate.bias", (1,))
    if d.tie:
        src.skip("lm_head.weight")
    else:
        sd["lm_head.weight"] = src.get("lm_head.weight", (d.vocab, d.hidden),
                                       "tie_word_embeddings=false")
    src.require_all_used("ouro")
    return run, fuse_state_dict(sd, run.model), {"total_ut_steps": steps}


def export_ouro(run: RunConfig, sd: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    sd = unfuse_state_dict(sd, run.model)  # the format's separate projections
    m = run.model
    checks = [
        (m.n_prelude == 0 and m.n_coda == 0, "model.n_prelude and model.n_coda must be 0"),
        (m.injection == "none" and m.init_state == "embed", "model.injection must be none with init_state embed"),
        (m.state_norm and not m.final_norm and not m.pre_coda_norm,
         "model.state_norm must be true and model.final_norm false"),
        (m.norm == "rmsnorm" and m.norm_placement == "peri", "model.norm must be rmsnorm with placement peri"),
        (m.mlp == "swiglu" and m.positions == "rope", "model.mlp must be swiglu and positions rope"),
        (not m.bias and m.qkv_bias in (None, "none"), "model.bias must be false with no q/k/v bias"),
        (m.embed_scale == 1.0 and not m.qk_norm, "model.embed_scale must be 1 and qk_norm false"),
    ]
    problems = [msg for ok, msg in checks if not ok]
    if problems:
        raise UserError("this model cannot be written as ouro: " + "; ".join(problems)
                        + " (use --to hf for any LoopedLM)")
    kv = m.kv_heads or m.heads
    inter = sd["core.0.mlp.up_proj.weight"].shape[0]
    d = run.depth
    steps = d.value if d.dist == "fixed" else median_depth(d)
    config = {
        "architectures": [ARCH], "model_type": MODEL_TYPE, "hidden_size": m.hidden,
        "intermediate_size": int(inter), "num_hidden_layers": m.n_core,
        "num_attention_heads": m.heads, "num_key_value_heads": kv, "head_dim": m.hidden // m.heads,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_seq_len,
        "rope_theta": m.rope_base, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", "total_ut_steps": steps,
        "attention_dropout": 0.0, "use_sliding_window": False, "max_window_layers": m.n_core,
        "early_exit_threshold": 1.0, "use_cache": True, "rope_scaling": None,
        "layer_types": ["full_attention"] * m.n_core, "initializer_range": m.init_std,
        "torch_dtype": str(sd["embed.weight"].dtype).replace("torch.", ""),
    }
    out = {"model.embed_tokens.weight": sd["embed.weight"]}
    for i in range(m.n_core):
        for ours, theirs in _BLOCK.items():
            out[f"model.layers.{i}.{theirs}"] = sd[f"core.{i}.{ours}"]
    out["model.norm.weight"] = sd["state_norm.weight"]
    if m.exit_gate:
        out["model.early_exit_gate.weight"] = sd["exit_gate.weight"]
        out["model.early_exit_gate.bias"] = sd["exit_gate.bias"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return config, out
