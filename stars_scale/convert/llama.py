"""Retrofitting a pretrained Llama/Qwen2-style decoder into a looped model.

Choose which layers become the prelude, the core (looped) and the coda, e.g.
`--prelude 0-1 --core 16-19 --coda 20-21`; every other layer is dropped. Ranges may overlap
(the core can start as a *copy* of layers that also stay in the prelude), which is how "all
layers as prelude, zero loops" reproduces the original network.

The recurrence is initialised so that one iteration reproduces the sliced network
prelude -> core -> coda exactly: the initial state is the prelude output (`init_state: embed`)
and the adapter is W = [a·I | (1-a)·I] on cat(s, e) (a = `state_weight`, default 1/2), so the
first iteration sees a·e + (1-a)·e = e; later iterations see a·s + (1-a)·e, a mix of the state
and the input (a = 1 ignores the input, a = 0 the state). With a = 1/2 the products are exact
in binary floating point, so the first iteration's input is e bit for bit.

Llama: all of q/k/v/o carry `attention_bias`, the MLP `mlp_bias` (they must agree). Qwen2:
q/k/v have a bias, o and the MLP do not.
"""
from __future__ import annotations

from typing import Any

import torch

from stars_scale.config import DepthConfig, ModelConfig, RunConfig
from stars_scale.convert.decoder_config import check_model_type, read_decoder_shape
from stars_scale.convert.hfdir import HFDir
from stars_scale.errors import UserError
from stars_scale.model.fused import fuse_state_dict

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_WEIGHTS = {
    "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj",
}


def parse_layers(spec: str | None, n_layers: int, flag: str, where: str) -> list[int]:
    """'0-1', '16-19', '3', '0,2-3' or 'none' -> layer indices, checked against the model."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return []
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
            else:
                a = b = int(part)
        except ValueError:
            raise UserError(f"{flag} {spec!r}: expected layer ranges like 0-1 or 16-19,20") from None
        if a > b:
            raise UserError(f"{flag} {spec!r}: range {part} is empty (start > end)")
        if a < 0 or b >= n_layers:
            raise UserError(f"{flag} {spec!r}: layer range {part} is outside the model "
                            f"({where}: num_hidden_layers={n_layers}, layers 0-{n_layers - 1})")
        out.extend(range(a, b + 1))
    if len(set(out)) != len(out):
        raise UserError(f"{flag} {spec!r}: a layer is listed twice")
    return out


def import_llama(src: HFDir, prelude: str | None, core: str | None, coda: str | None,
                 state_weight: float = 0.5) -> tuple[RunConfig, dict[str, torch.Tensor], dict[str, Any]]:
    mt = check_model_type(src, SUPPORTED, "llama")
    d = read_decoder_shape(src)
    cp = src.config_path
    where = str(cp)
    pre = parse_layers(prelude, d.layers, "--prelude", where)
    cor = parse_layers(core, d.layers, "--core", where)
    cod = parse_layers(coda, d.layers, "--coda", where)
    if not cor:
        raise UserError("--core is required for --from llama: the layers to loop, e.g. --core 16-19")
    if not 0.0 <= state_weight <= 1.0:
        raise UserError(f"--state-weight must be in [0, 1], got {state_weight}")
    if mt == "qwen2":
        attn_bias, mlp_bias, qkv = True, False, "qkv"
        bias = False
    else:
        attn_bias = src.cfg("attention_bias", False, bool)
        mlp_bias = src.cfg("mlp_bias", False, bool)
        if attn_bias != mlp_bias:
            raise UserError(f"{cp}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not "
                            f"supported (LoopedLM biases o_proj and the MLP together)")
        bias, qkv = attn_bias, None
    model = ModelConfig(
        vocab_size=d.vocab, hidden=d.hidden, heads=d.heads,
        kv_heads=None if d.kv_heads == d.heads else d.kv_heads, mlp="swiglu",
        mlp_hidden=d.intermediate, norm="rmsnorm", norm_eps=d.eps, norm_placement="pre",
        positions="rope", rope_base=d.rope_theta, max_seq_len=d.max_pos,
        n_prelude=len(pre), n_core=len(cor), n_coda=len(cod), injection="concat-linear",
        init_state="embed", state_norm=False, final_norm=True, tie_embeddings=d.tie,
        embed_scale=1.0, bias=bias, qkv_bias=qkv, dropout=0.0,
        init_std=float(src.cfg("initializer_range", 0.02, (int, float))),
    )
    run = RunConfig(model=model, depth=DepthConfig(dist="fixed", value=1))
    h, hd, kv, inter = d.hidden, d.head_dim, d.kv_heads, d.intermediate
    shapes = {
        "attn.q_proj": (d.heads * hd, h), "attn.k_proj": (kv * hd, h), "attn.v_proj": (kv * hd, h),
        "attn.o_proj": (h, d.heads * hd), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }
    has_bias = {"attn.q_proj": attn_bias, "attn.k_proj": attn_bias, "attn.v_proj": attn_bias,
                "attn.o_proj": attn_bias and mt != "qwen2", "mlp.gate_proj": mlp_bias,
                "mlp.up_proj": mlp_bias, "mlp.down_proj": mlp_bias}

    sd: dict[str, torch.Tensor] = {"embed.weight": src.get("model.embed_tokens.weight", (d.vocab, h))}
    for part, layers in (("prelude", pre), ("core", cor), ("coda", cod)):
        for j, i in enumerate(layers):
            theirs = f"model.layers.{i}"
            sd[f"{part}.{j}.norm1.weight"] = src.get(f"{theirs}.input_layernorm.weight", (h,))
            sd[f"{part}.{j}.norm2.weight"] = src.get(f"{theirs}.post_attention_layernorm.weight", (h,))
            for ours, name in _WEIGHTS.items():
                sd[f"{part}.{j}.{ours}.weight"] = src.get(f"{theirs}.{name}.weight", shapes[ours])
                if has_bias[ours]:
                    sd[f"{part}.{j}.{ours}.bias"] = src.get(f"{theirs}.{name}.bias", shapes[ours][:1])
    eye = torch.eye(h, dtype=sd["embed.weight"].dtype)
    sd["adapter.weight"] = torch.cat([state_weight * eye, (1.0 - state_weight) * eye], dim=1)
    if bias:
        sd["adapter.bias"] = torch.zeros(h, dtype=eye.dtype)
    sd["final_norm.weight"] = src.get("model.norm.weight", (h,))
    if d.tie:
        src.skip("lm_head.weight")
    else:
        sd["lm_head.weight"] = src.get("lm_head.weight", (d.vocab, h), "tie_word_embeddings=false")
    # dropped layers are expected leftovers; anything else means a different architecture
    kept = set(pre) | set(cor) | set(cod)
    for name in src.unused():
        parts = name.split(".")
        if name.endswith("rotary_emb.inv_freq"):  # old checkpoints stored this derived buffer
            src.skip(name)
        elif parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) not in kept:
            src.skip(name)
    src.require_all_used(mt)
    notes = {"model_type": mt, "layers": {"prelude": pre, "core": cor, "coda": cod},
             "dropped": sorted(set(range(d.layers)) - kept), "state_weight": state_weight}
    return run, fuse_state_dict(sd, run.model), notes
