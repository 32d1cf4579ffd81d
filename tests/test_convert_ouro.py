"""Ouro import/export against a re-implementation of Ouro's forward (`modeling_ouro.py`).

Ouro is not in `transformers`, so `ouro_forward` below restates its equations on the raw
tensors: the whole stack looped `total_ut_steps` times, each layer with a norm before and after
both sublayers (outside the residual), `model.norm` after every loop, the exit gate read on each
loop's normalised state, logits from the last state; rotate-half RoPE computed as HF does.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from stars_scale.convert import export_checkpoint, import_checkpoint, load_converted, load_converted_run
from stars_scale.model.looped import LoopedLM

VOCAB, H, HEADS, KV, INTER, LAYERS, STEPS, THETA = 80, 32, 4, 2, 48, 3, 4, 1000.0


def ouro_config(tie: bool = False) -> dict:
    return {"architectures": ["OuroForCausalLM"], "model_type": "ouro", "hidden_size": H,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV, "head_dim": H // HEADS, "vocab_size": VOCAB,
            "max_position_embeddings": 64, "rope_theta": THETA, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": tie, "hidden_act": "silu", "total_ut_steps": STEPS,
            "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
            "layer_types": ["full_attention"] * LAYERS, "torch_dtype": "float32"}


def ouro_weights(seed: int = 0, tie: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    hd = H // HEADS
    w = {"model.embed_tokens.weight": rnd(VOCAB, H, std=0.5)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        w[f"{p}.self_attn.q_proj.weight"] = rnd(HEADS * hd, H)
        w[f"{p}.self_attn.k_proj.weight"] = rnd(KV * hd, H)
        w[f"{p}.self_attn.v_proj.weight"] = rnd(KV * hd, H)
        w[f"{p}.self_attn.o_proj.weight"] = rnd(H, HEADS * hd)
        w[f"{p}.mlp.gate_proj.weight"] = rnd(INTER, H)
        w[f"{p}.mlp.up_proj.weight"] = rnd(INTER, H)
        w[f"{p}.mlp.down_proj.weight"] = rnd(H, INTER)
        for n in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm",
                  "post_attention_layernorm_2"):
            w[f"{p}.{n}.weight"] = 1.0 + rnd(H, std=0.1)
    w["model.norm.weight"] = 1.0 + rnd(H, std=0.1)
    w["model.early_exit_gate.weight"] = rnd(1, H)
    w["model.early_exit_gate.bias"] = rnd(1)
    if not tie:
        w["lm_head.weight"] = rnd(VOCAB, H)
    return w


def write_ouro(d: Path, w: dict, cfg: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(w, str(d / "model.safetensors"))
    return d


def _rms(x, w, eps=1e-6):
    xf = x.to(torch.float32)
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def ouro_forward(w, ids, steps, tie=False):
    B, T = ids.shape
    hd = H // HEADS
    inv = 1.0 / (THETA ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = torch.outer(torch.arange(T).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    mask = torch.full((T, T), float("-inf")).triu(1)
    x = w["model.embed_tokens.weight"][ids]
    gates = []
    for _ in range(steps):
        for i in range(LAYERS):
            p = f"model.layers.{i}"
            y = _rms(x, w[f"{p}.input_layernorm.weight"])
            q = (y @ w[f"{p}.self_attn.q_proj.weight"].T).view(B, T, -1, hd).transpose(1, 2)
            k = (y @ w[f"{p}.self_attn.k_proj.weight"].T).view(B, T, -1, hd).transpose(1, 2)
            v = (y @ w[f"{p}.self_attn.v_proj.weight"].T).view(B, T, -1, hd).transpose(1, 2)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            k, v = k.repeat_interleave(HEADS // KV, dim=1), v.repeat_interleave(HEADS // KV, dim=1)
            att = torch.softmax(q @ k.transpose(2, 3) * hd ** -0.5 + mask, dim=-1) @ v
            a = att.transpose(1, 2).reshape(B, T, -1) @ w[f"{p}.self_attn.o_proj.weight"].T
            x = x + _rms(a, w[f"{p}.input_layernorm_2.weight"])
            y = _rms(x, w[f"{p}.post_attention_layernorm.weight"])
            m = (F.silu(y @ w[f"{p}.mlp.gate_proj.weight"].T) * (y @ w[f"{p}.mlp.up_proj.weight"].T)) \
                @ w[f"{p}.mlp.down_proj.weight"].T
            x = x + _rms(m, w[f"{p}.post_attention_layernorm_2.weight"])
        x = _rms(x, w["model.norm.weight"])
        gates.append(x @ w["model.early_exit_gate.weight"].T + w["model.early_exit_gate.bias"])
    head = w["model.embed_tokens.weight"] if tie else w["lm_head.weight"]
    return x @ head.T, gates


@pytest.mark.parametrize("tie", [False, True])
def test_ouro_logits_and_exit_gate_match(tmp_path, tie):
    w = ouro_weights(tie=tie)
    import_checkpoint("ouro", write_ouro(tmp_path / "ouro", w, ouro_config(tie)), tmp_path / "ckpt")
    run, _ = load_converted_run(tmp_path / "ckpt")
    assert (run.model.n_core, run.model.norm_placement, run.model.state_norm, run.model.final_norm,
            run.model.exit_gate, run.depth.dist, run.depth.value) == \
        (LAYERS, "peri", True, False, True, "fixed", STEPS)
    cfg, sd = load_converted(tmp_path / "ckpt")
    model = LoopedLM(cfg)
    model.load_state_dict(sd)
    model.eval()
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for steps in (1, 2, STEPS, 6):
            out = model(x, n_free=steps, n_grad=0, return_states=True)
            ref, ref_gates = ouro_forward(w, x, steps, tie=tie)
            assert ref.abs().max() > 0.1
            torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
            for t, g in enumerate(ref_gates, start=1):  # states[0] is s_0 = embeddings
                torch.testing.assert_close(model.exit_logits(out.states[t]), g, rtol=1e-5, atol=1e-5)


def test_ouro_export_import_is_bit_exact(tmp_path):
    w = {k: v.to(torch.bfloat16) for k, v in ouro_weights(seed=2).items()}
    cfg = ouro_config()
    import_checkpoint("ouro", write_ouro(tmp_path / "ouro", w, cfg), tmp_path / "a")
    export_checkpoint(tmp_path / "a", "ouro", tmp_path / "out")
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(back) == set(w) and all(torch.equal(back[k], w[k]) for k in w)
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rope_theta", "rms_norm_eps", "total_ut_steps",
                "tie_word_embeddings", "max_position_embeddings"):
        assert exported[key] == cfg[key], key
    import_checkpoint("ouro", tmp_path / "out", tmp_path / "b")
    run_a, sd_a = load_converted_run(tmp_path / "a")
    run_b, sd_b = load_converted_run(tmp_path / "b")
    assert run_a.model == run_b.model and run_a.depth == run_b.depth
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


class OuroConfigStandIn:
    """How upstream `OuroConfig(**config_json)` binds keys (modeling/configuration_ouro.py):
    named parameters, then PretrainedConfig(tie_word_embeddings=..., **kwargs)."""

    PARAMS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
              "use_cache", "tie_word_embeddings", "rope_theta", "rope_scaling", "use_sliding_window",
              "sliding_window", "max_window_layers", "layer_types", "attention_dropout", "total_ut_steps",
              "early_exit_threshold")

    def __init__(self, **cfg):
        for k in self.PARAMS:
            if k in cfg:
                setattr(self, k, cfg.pop(k))
        for k, v in cfg.items():  # PretrainedConfig's **kwargs
            setattr(self, k, v)


def test_exported_ouro_config_binds_and_greedy_tokens_match_reference(tmp_path):
    from stars_scale.generate import generate

    w = ouro_weights(seed=4)
    import_checkpoint("ouro", write_ouro(tmp_path / "ouro", w, ouro_config()), tmp_path / "a")
    export_checkpoint(tmp_path / "a", "ouro", tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    oc = OuroConfigStandIn(**exported)
    assert (oc.hidden_size, oc.num_key_value_heads, oc.total_ut_steps, oc.early_exit_threshold) == (H, KV, STEPS, 1.0)
    assert oc.layer_types == ["full_attention"] * LAYERS and oc.use_sliding_window is False
    import_checkpoint("ouro", tmp_path / "hf", tmp_path / "b")
    cfg, sd = load_converted(tmp_path / "b")
    model = LoopedLM(cfg)
    model.load_state_dict(sd)
    w = load_file(str(tmp_path / "hf" / "model.safetensors"))
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, ouro_forward(w, seq, STEPS)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    res = generate(model, ids, max_new_tokens=8, depth=STEPS)
    assert len(set(seq[:, 5:].flatten().tolist())) > 2
    assert torch.equal(res.tokens, seq)
