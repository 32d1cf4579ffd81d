"""config.json fields shared by the Llama-family decoders (Llama, Qwen2, Ouro).

One reader so every format checks the same things the same way: rotary base and type (only
plain RoPE is supported; scaled variants change the positions the weights were trained with),
head_dim equal to hidden/heads, no sliding-window layers, SiLU-gated MLP.
"""
from __future__ import annotations

from dataclasses import dataclass

from stars_scale.convert.hfdir import HFDir
from stars_scale.errors import UserError


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int
    max_pos: int
    rope_theta: float
    eps: float
    tie: bool


def rope_theta(src: HFDir, default: float = 10000.0) -> float:
    cp = src.config_path
    params = src.config.get("rope_parameters") or src.config.get("rope_scaling")
    if isinstance(params, dict) and len(params) > 0:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", None):
            raise UserError(f"{cp}: rope_type {kind!r} is not supported (only plain RoPE)")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    elif params not in (None, {}):
        raise UserError(f"{cp}: rope_parameters/rope_scaling={params!r} is not understood")
    return float(src.cfg("rope_theta", default, (int, float)))


def read_decoder_shape(src: HFDir) -> DecoderShape:
    cp = src.config_path
    h = src.cfg("hidden_size", types=int)
    H = src.cfg("num_attention_heads", types=int)
    kv = src.cfg("num_key_value_heads", H, int)
    if h % H:
        raise UserError(f"{cp}: hidden_size {h} is not divisible by num_attention_heads {H}")
    hd = src.cfg("head_dim", h // H, int)
    if hd != h // H:
        raise UserError(f"{cp}: head_dim {hd} != hidden_size // num_attention_heads = {h // H} "
                        f"(not supported by LoopedLM)")
    if kv < 1 or H % kv:
        raise UserError(f"{cp}: num_key_value_heads {kv} does not divide num_attention_heads {H}")
    act = src.cfg("hidden_act", "silu", str)
    if act not in ("silu", "swish"):
        raise UserError(f"{cp}: hidden_act {act!r} is not supported (SiLU-gated MLP only)")
    if src.cfg("use_sliding_window", False, bool):
        raise UserError(f"{cp}: use_sliding_window=true is not supported")
    layer_types = src.cfg("layer_types", None, list)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise UserError(f"{cp}: layer_types other than full_attention are not supported")
    return DecoderShape(
        hidden=h, heads=H, kv_heads=kv, head_dim=hd,
        intermediate=src.cfg("intermediate_size", types=int),
        layers=src.cfg("num_hidden_layers", types=int),
        vocab=src.cfg("vocab_size", types=int),
        max_pos=src.cfg("max_position_embeddings", 2048, int),
        rope_theta=rope_theta(src),
        eps=float(src.cfg("rms_norm_eps", 1e-6, (int, float))),
        tie=src.cfg("tie_word_embeddings", False, bool),
    )


def check_model_type(src: HFDir, allowed: dict[str, str], fmt: str) -> str:
    """model_type must be one of `allowed` (model_type -> architecture class); returns it."""
    mt = src.config.get("model_type")
    if mt not in allowed:
        raise UserError(f"{src.config_path}: unknown architecture model_type={mt!r} for --from "
                        f"{fmt} (supported: {', '.join(sorted(allowed))})")
    return mt
