"""Huginn (`huginn_raven`, seal-rg/recurrent-pretraining `recpre/raven_modeling_minimal.py`).

The raven forward, as that file defines it:

    e   = prelude(wte(x) * embed_scale)                    embed_scale = sqrt(n_embd)
    s_0 = trunc_normal(std, ±3 std) * embed_scale           std = sqrt(2 / (5 n_embd))
    s_t = core_block(adapter(cat[s_{t-1}, e]))              adapter: Linear(2h -> h)
    y   = lm_head(ln_f(coda(ln_f(s_r))))                    ln_f used twice, same weights

with SandwichBlocks  x = norm_2(x + attn(norm_1(x)));  x = norm_4(x + mlp(norm_3(x))),
a fused `Wqkv` (chunks [n_embd, kv*hd, kv*hd]), a per-head `qk_bias` [2, 1, H, hd] added to q
and k before RoPE, interleaved ("complex-like") RoPE with base `rope_base`, a fused gated MLP
`fc` (first half -> SiLU gate, second half -> up) and `proj`, RMSNorm (fp32 inside).
Training depth: r = Poisson(LogNormal(ln(mean_recurrence) - 1/8, 1/2)) + 1 with gradients
through the last `mean_backprop_depth` iterations; evaluation runs `mean_recurrence` iterations.

Mapped onto LoopedLM: sandwich blocks, concat-linear injection, random initial state,
`pre_coda_norm: true`, `qkv_bias: qk`; the fused matrices are split, the RoPE layout is turned
into rotate-half by permuting q/k rows (see rope_layout.py), and the persistent `freqs_cis`
buffer is recomputed (it is derived from rope_base and block_size).

Only what raven runs crosses the border. raven multiplies embeddings by sqrt(n_embd) whatever
`init_values.embed_scale` says, and its attention has no grouped-query path (SDPA without
enable_gqa). Export therefore repeats a GQA model's k/v heads to n_heads (the same attention) and
writes a model whose `embed_scale` is not sqrt(hidden) with its embedding rescaled when that is
exact (untied, a power-of-two ratio), else refuses naming the field. Import refuses a config.json
raven would read otherwise: another embed_scale, num_key_value_heads != n_heads, an alias key
(num_attention_heads, hidden_size, num_hidden_layers) that disagrees with the key it stands for,
tie_word_embeddings against the tie_embeddings raven reads.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from stars_scale.config import DepthConfig, ModelConfig, RunConfig
from stars_scale.convert.hfdir import HFDir
from stars_scale.convert.rope_layout import half_to_interleaved, interleaved_to_half
from stars_scale.errors import UserError
from stars_scale.model.fused import fuse_state_dict, unfuse_state_dict
from stars_scale.stars.depth import median_depth

MODEL_TYPE = "huginn_raven"
ARCH = "RavenForCausalLM"
# RavenConfig's fixed class names: other values name variants the minimal file does not build.
FIXED = {
    "block_class_name": "SandwichBlock",
    "norm_class_name": "RMSNorm_llama",
    "mlp_class_name": "GatedMLP",
    "nonlin_name": "SiLU",
    "injection_type": "linear",
}
SIGMA = 0.5  # raven's randomized_iteration_sampler
# RavenConfig.attribute_map: alias -> the key it stands for
ALIASES = {"num_attention_heads": "n_heads", "hidden_size": "n_embd", "num_hidden_layers": "n_layers"}


def derived_init_values(n_embd: int) -> dict[str, float]:
    """RavenConfig.init_values without the depth-dependent `out_proj` entry."""
    return {"std": math.sqrt(2 / (5 * n_embd)), "embedding": math.sqrt(2 / (5 * n_embd)),
            "embed_scale": math.sqrt(n_embd)}


def _block_names(prefix: str) -> dict[str, str]:
    return {
        "norm_1": f"{prefix}.norm_1.weight", "norm_2": f"{prefix}.norm_2.weight",
        "norm_3": f"{prefix}.norm_3.weight", "norm_4": f"{prefix}.norm_4.weight",
        "Wqkv": f"{prefix}.attn.Wqkv.weight", "qk_bias": f"{prefix}.attn.qk_bias",
        "proj": f"{prefix}.attn.proj.weight", "fc": f"{prefix}.mlp.fc.weight",
        "mlp_proj": f"{prefix}.mlp.proj.weight",
    }


_PARTS = (("prelude", "prelude"), ("core_block", "core"), ("coda", "coda"))


def import_huginn(src: HFDir) -> tuple[RunConfig, dict[str, torch.Tensor], dict[str, Any]]:
    cp = src.config_path
    mt = src.config.get("model_type")
    archs = src.config.get("architectures") or []
    if mt != MODEL_TYPE and ARCH not in archs:
        raise UserError(f"{cp}: model_type {mt!r} is not {MODEL_TYPE!r} (architectures {archs}); "
                        f"not a Huginn/raven checkpoint")
    for key, want in FIXED.items():
        got = src.cfg(key, want, str)
        if got != want:
            raise UserError(f"{cp}: {key}={got!r} is not supported (the raven format builds {want!r})")
    if float(src.cfg("test_time_noise", 0, (int, float))) != 0:
        raise UserError(f"{cp}: test_time_noise > 0 is not supported (LoopedLM injects no noise)")
    if src.cfg("bias", False, bool):
        raise UserError(f"{cp}: bias=true (a bias on the adapter only) is not supported")

    h = src.cfg("n_embd", types=int)
    H = src.cfg("n_heads", src.config.get("num_attention_heads", ...), int)
    if h % H:
        raise UserError(f"{cp}: n_embd {h} is not divisible by n_heads {H}")
    hd = h // H
    if src.cfg("head_dim", hd, int) != hd:
        raise UserError(f"{cp}: head_dim {src.config['head_dim']} != n_embd // n_heads = {hd}")
    kv = src.cfg("num_key_value_heads", H, int)
    if kv != H:
        raise UserError(f"{cp}: num_key_value_heads {kv} != n_heads {H}: raven's attention has no grouped-query "
                        "path (its SDPA call fails on such weights), so this is not a checkpoint raven runs")
    for alias, key in ALIASES.items():  # RavenConfig.attribute_map: both set, one overrides the other
        if alias in src.config and key in src.config and src.config[alias] != src.config[key]:
            raise UserError(f"{cp}: {alias}={src.config[alias]!r} and {key}={src.config[key]!r} disagree "
                            f"(raven reads {alias} as an alias of {key}, so one silently overrides the other)")
    qk_bias = src.cfg("qk_bias", True, bool)
    inter = src.cfg("intermediate_size", types=int)
    V = src.cfg("padded_vocab_size", src.cfg("vocab_size", types=int), int)
    n_pre = src.cfg("n_layers_in_prelude", 2, int)
    n_core = src.cfg("n_layers_in_recurrent_block", 4, int)
    n_coda = src.cfg("n_layers_in_coda", 2, int)
    if n_core < 1:
        raise UserError(f"{cp}: n_layers_in_recurrent_block must be >= 1, got {n_core}")
    if "n_layers" in src.config and src.cfg("n_layers", types=int) != n_pre + n_core + n_coda:
        raise UserError(f"{cp}: n_layers {src.config['n_layers']} != prelude {n_pre} + recurrent "
                        f"{n_core} + coda {n_coda}")
    tie = src.cfg("tie_embeddings", True, bool)  # what raven reads (its default: tied)
    tie_word = src.cfg("tie_word_embeddings", tie, bool)
    if tie_word != tie:
        raise UserError(f"{cp}: tie_word_embeddings={tie_word} but raven reads tie_embeddings={tie}"
                        f"{'' if 'tie_embeddings' in src.config else ' (its default)'}")
    iv = dict(derived_init_values(h))
    given_iv = src.cfg("init_values", {}, dict)  # the JSON value wins in RavenConfig, as here
    for k in ("std", "embed_scale"):
        if k in given_iv:
            if not isinstance(given_iv[k], (int, float)) or isinstance(given_iv[k], bool):
                raise UserError(f"{cp}: init_values.{k}={given_iv[k]!r} is not a number")
            iv[k] = float(given_iv[k])
    if not math.isclose(iv["embed_scale"], math.sqrt(h), rel_tol=1e-12):
        raise UserError(f"{cp}: init_values.embed_scale={iv['embed_scale']:g}, but raven scales embeddings by "
                        f"sqrt(n_embd) = {math.sqrt(h):g} whatever config.json says; the weights would run "
                        "differently there than here")
    embed_scale = math.sqrt(h)
    std = iv["std"]
    if std < 0:
        raise UserError(f"{cp}: init_values.std must be >= 0, got {std}")
    mean_rec = src.cfg("mean_recurrence", 32, int)
    backprop = src.cfg("mean_backprop_depth", 8, int)
    if mean_rec < 1 or backprop < 1:
        raise UserError(f"{cp}: mean_recurrence and mean_backprop_depth must be >= 1")

    model = ModelConfig(
        vocab_size=V, hidden=h, heads=H, kv_heads=None,
        mlp="swiglu", mlp_hidden=inter, norm="rmsnorm",
        norm_eps=float(src.cfg("norm_eps", 1e-6, (int, float))), norm_placement="sandwich",
        positions="rope", rope_base=float(src.cfg("rope_base", 50_000, (int, float))),
        max_seq_len=src.cfg("block_size", 4096, int),
        n_prelude=n_pre, n_core=n_core, n_coda=n_coda, injection="concat-linear",
        init_state="random" if std > 0 else "zero",
        # None: LoopedLM's default sqrt(2/(5h)) * embed_scale, which is raven's std * embed_scale
        init_state_std=None if std == 0 or math.isclose(std, derived_init_values(h)["std"], rel_tol=1e-12)
        else std * embed_scale,
        state_norm=False, final_norm=True, pre_coda_norm=True, tie_embeddings=tie,
        embed_scale=embed_scale, bias=False, qkv_bias="qk" if qk_bias else "none",
        dropout=0.0, init_std=derived_init_values(h)["embedding"],
    )
    depth = DepthConfig(dist="poisson-lognormal", mean=float(mean_rec), sigma=SIGMA, min=1,
                        max=max(100, 8 * mean_rec), backprop=backprop, eval_depth=mean_rec)
    run = RunConfig(model=model, depth=depth)

    sd: dict[str, torch.Tensor] = {}
    sd["embed.weight"] = src.get("transformer.wte.weight", (V, h), f"vocab {V} x n_embd {h}")
    qkv_rows = (H + 2 * kv) * hd
    for raven_part, ours, n in ((p, o, c) for (p, o), c in zip(_PARTS, (n_pre, n_core, n_coda))):
        for i in range(n):
            nm = _block_names(f"transformer.{raven_part}.{i}")
            dst = f"{ours}.{i}"
            for j in (1, 2, 3, 4):
                sd[f"{dst}.norm{j}.weight"] = src.get(nm[f"norm_{j}"], (h,))
            wqkv = src.get(nm["Wqkv"], (qkv_rows, h), f"(n_heads + 2 kv_heads) * head_dim x n_embd")
            q, k, v = wqkv.split([H * hd, kv * hd, kv * hd], dim=0)
            sd[f"{dst}.attn.q_proj.weight"] = interleaved_to_half(q, hd)
            sd[f"{dst}.attn.k_proj.weight"] = interleaved_to_half(k, hd)
            sd[f"{dst}.attn.v_proj.weight"] = v
            if qk_bias:
                b = src.get(nm["qk_bias"], (2, 1, H, hd), "qk_bias=true in config.json")
                sd[f"{dst}.attn.q_proj.bias"] = interleaved_to_half(b[0, 0].reshape(H * hd), hd)
                sd[f"{dst}.attn.k_proj.bias"] = interleaved_to_half(b[1, 0].reshape(H * hd), hd)
            sd[f"{dst}.attn.o_proj.weight"] = src.get(nm["proj"], (h, h))
            fc = src.get(nm["fc"], (2 * inter, h), "2 * intermediate_size x n_embd")
            gate, up = fc.chunk(2, dim=0)
            sd[f"{dst}.mlp.gate_proj.weight"] = gate
            sd[f"{dst}.mlp.up_proj.weight"] = up
            sd[f"{dst}.mlp.down_proj.weight"] = src.get(nm["mlp_proj"], (h, inter))
    sd["adapter.weight"] = src.get("transformer.adapter.weight", (h, 2 * h))
    sd["final_norm.weight"] = src.get("transformer.ln_f.weight", (h,))
    if tie:
        src.skip("lm_head.weight")  # raven ties it to wte on load
    else:
        sd["lm_head.weight"] = src.get("lm_head.weight", (V, h), "tie_embeddings=false")
    if src.has("freqs_cis"):  # persistent but derived from rope_base and block_size: check it
        check_freqs_cis(src, hd, model.max_seq_len, model.rope_base)
    src.require_all_used("huginn_raven")
    notes = {"sampling_scheme": src.config.get("sampling_scheme"),
             "rope": "interleaved in the source; q/k rows permuted to rotate-half"}
    return run, fuse_state_dict(sd, run.model), notes


# ---------------------------------------------------------------------- export


def _explain(problems: list[str], fmt: str) -> None:
    if problems:
        raise UserError(f"this model cannot be written as {fmt}: " + "; ".join(problems)
                        + " (use --to hf for any LoopedLM)")


def raven_freqs_cis(head_dim: int, block_size: int, base: float) -> torch.Tensor:
    """raven's persistent buffer [1, T, 1, D/2, 2] (cos, sin), computed as raven does (fp32)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(block_size, dtype=torch.float32)
    freqs = torch.outer(t, inv).float()
    return torch.stack([torch.cos(freqs)[None, :, None, :], torch.sin(freqs)[None, :, None, :]], dim=4)


FREQS_REFUSE = 1e-3  # beyond this the stored table is another RoPE (base, length or layout)


def check_freqs_cis(src: HFDir, head_dim: int, block_size: int, base: float) -> None:
    """Compare the stored `freqs_cis` with the table recomputed from config.json.

    Within 2 ulp of the stored dtype (+1e-5 for cos/sin computed on another device): silent.
    Up to FREQS_REFUSE (or the dtype's rounding, if larger): a warning with the numbers (the model runs on the recomputed table).
    Beyond, or another shape: a UserError, since the checkpoint was trained with other positions.
    """
    import warnings

    want = raven_freqs_cis(head_dim, block_size, base)
    shape = src.shape("freqs_cis")
    if tuple(shape) != tuple(want.shape):
        raise UserError(f"{src.path}: freqs_cis has shape {list(shape)}, but block_size={block_size} and "
                        f"head_dim={head_dim} give {list(want.shape)}")
    stored = src.get("freqs_cis")
    diff = (stored.float() - want).abs()
    worst = float(diff.max())
    pos = int(diff.amax(dim=(0, 2, 3, 4)).argmax())
    tol = 2 * torch.finfo(stored.dtype).eps + 1e-5 if stored.is_floating_point() else 0.0
    what = (f"{src.path}: stored freqs_cis ({str(stored.dtype).replace('torch.', '')}) differs from the table "
            f"recomputed from rope_base={base:g}, block_size={block_size} by max |d| = {worst:.3g} "
            f"(at position {pos}; rounding of the dtype allows {tol:.3g})")
    if worst > max(tol, FREQS_REFUSE):
        raise UserError(what + "; the checkpoint uses other rotary positions than its config.json says")
    if worst > tol:
        warnings.warn(what + "; using the recomputed table", stacklevel=2)


def _repeat_heads(w: torch.Tensor, head_dim: int, n_rep: int) -> torch.Tensor:
    """k/v projection rows (or bias) of kv heads -> of kv * n_rep heads, each kv head repeated for the
    n_rep query heads that read it (query head i reads kv head i // n_rep): the same attention."""
    if n_rep == 1:
        return w
    return w.unflatten(0, (-1, head_dim)).repeat_interleave(n_rep, dim=0).flatten(0, 1)


def _embedding_for_raven(m: ModelConfig, wte: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """The embedding raven must hold to compute wte(x) * model.embed_scale while it always multiplies
    by sqrt(n_embd) (RavenPreTrainedModel.emb_scale ignores config.json): the same matrix when the
    scales agree; rescaled by embed_scale / sqrt(n_embd) when that is exact (untied embeddings, a
    power-of-two ratio, no under/overflow); else (None, why)."""
    root = math.sqrt(m.hidden)
    if m.embed_scale == root:
        return wte, None
    ratio = m.embed_scale / root
    why = (f"model.embed_scale is {m.embed_scale:g}, but raven always scales embeddings by sqrt(hidden) = "
           f"{root:g} (init_values.embed_scale is ignored there)")
    if m.tie_embeddings:
        return wte, why + "; with tie_embeddings the shared embedding/head matrix cannot be rescaled"
    if math.frexp(ratio)[0] != 0.5 or ratio * root != m.embed_scale:
        return wte, why + f"; rescaling the embedding by {ratio:g} would not be exact (not a power of two)"
    scaled = wte * ratio
    if not torch.equal(scaled.double(), wte.double() * ratio):
        return wte, why + f"; rescaling the embedding by {ratio:g} under/overflows its dtype"
    return scaled, None


def export_huginn(run: RunConfig, sd: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    sd = unfuse_state_dict(sd, run.model)  # the format's separate projections
    m = run.model
    problems = []
    checks = [
        (m.norm == "rmsnorm", "model.norm must be rmsnorm"),
        (m.norm_placement == "sandwich", "model.norm_placement must be sandwich"),
        (m.mlp == "swiglu", "model.mlp must be swiglu"),
        (m.positions == "rope", "model.positions must be rope"),
        (m.injection == "concat-linear", "model.injection must be concat-linear"),
        (m.init_state in ("random", "zero"), "model.init_state must be random or zero"),
        (not m.state_norm, "model.state_norm must be false"),
        (m.final_norm and m.pre_coda_norm, "model.final_norm and model.pre_coda_norm must be true"),
        (not m.bias, "model.bias must be false"),
        (m.qkv_bias in ("qk", "none") or (m.qkv_bias is None and not m.bias),
         "model.qkv_bias must be qk or none"),
        (not m.qk_norm, "model.qk_norm must be false"),
        (not m.exit_gate, "model.exit_gate must be false"),
        (m.hidden % m.heads == 0, "hidden must be divisible by heads"),
    ]
    problems = [msg for ok, msg in checks if not ok]
    wte, scale_problem = _embedding_for_raven(m, sd["embed.weight"])
    problems += [scale_problem] if scale_problem else []
    _explain(problems, "huginn_raven")
    qk_bias = m.qkv_bias == "qk"
    h, H, hd = m.hidden, m.heads, m.hidden // m.heads
    n_rep = H // (m.kv_heads or H)  # GQA: k/v heads repeated to H heads (raven has no grouped-query path)
    inter = sd["core.0.mlp.up_proj.weight"].shape[0]
    d = run.depth
    mean_rec = int(round(d.mean)) if d.dist == "poisson-lognormal" else median_depth(d)
    backprop = d.backprop if d.backprop is not None else mean_rec
    iv = derived_init_values(h)  # embed_scale: sqrt(n_embd), the only scale raven runs
    if m.init_state == "zero":
        iv["std"] = 0.0
    elif m.init_state_std is not None or m.embed_scale != iv["embed_scale"]:
        # raven's s_0: trunc_normal(init_values.std) * sqrt(n_embd); LoopedLM's: trunc_normal(init_state_std),
        # whose default is sqrt(2/(5h)) * model.embed_scale
        state_std = m.init_state_std if m.init_state_std is not None else iv["std"] * m.embed_scale
        iv["std"] = state_std / iv["embed_scale"]
    n_layers = m.n_prelude + m.n_core + m.n_coda
    eff = m.n_prelude + m.n_coda + m.n_core * mean_rec
    iv["out_proj"] = math.sqrt(2 / (5 * h)) / math.sqrt(2 * eff)
    dtype = sd["embed.weight"].dtype
    config = {
        "architectures": [ARCH], "model_type": MODEL_TYPE,
        "n_embd": h, "n_heads": H, "num_key_value_heads": H, "head_dim": hd, "n_layers": n_layers,
        "block_size": m.max_seq_len, "vocab_size": m.vocab_size, "padded_vocab_size": m.vocab_size,
        # RavenConfig passes tie_word_embeddings=tie_embeddings itself: writing it too is a
        # TypeError (multiple values) in RavenConfig.__init__. The vocabulary is not padded, so
        # the padding multiple is what vocab_size is a multiple of (capped at raven's 4096).
        "padding_multiple": math.gcd(m.vocab_size, 4096), "tie_embeddings": m.tie_embeddings,
        "intermediate_size": int(inter), "bias": False,
        "architecture_class_name": "RecurrentGPT", **FIXED, "norm_eps": m.norm_eps,
        "init_strategy": "takase", "init_orthogonal": False, "state_init": "like-init",
        "n_layers_in_recurrent_block": m.n_core, "mean_recurrence": mean_rec,
        "sampling_scheme": "poisson-lognormal-filling", "mean_backprop_depth": backprop,
        "n_layers_in_prelude": m.n_prelude, "n_layers_in_coda": m.n_coda, "qk_bias": qk_bias,
        "activation_checkpoint_impl": "per-iteration", "rope_base": m.rope_base,
        "torch_dtype": str(dtype).replace("torch.", ""), "effective_expected_depth": eff,
        "init_values": iv,
    }
    out: dict[str, torch.Tensor] = {"transformer.wte.weight": wte}
    for raven_part, ours in _PARTS:
        n = {"prelude": m.n_prelude, "core": m.n_core, "coda": m.n_coda}[ours]
        for i in range(n):
            nm = _block_names(f"transformer.{raven_part}.{i}")
            src = f"{ours}.{i}"
            for j in (1, 2, 3, 4):
                out[nm[f"norm_{j}"]] = sd[f"{src}.norm{j}.weight"]
            out[nm["Wqkv"]] = torch.cat([
                half_to_interleaved(sd[f"{src}.attn.q_proj.weight"], hd),
                half_to_interleaved(_repeat_heads(sd[f"{src}.attn.k_proj.weight"], hd, n_rep), hd),
                _repeat_heads(sd[f"{src}.attn.v_proj.weight"], hd, n_rep)], dim=0)
            if qk_bias:
                qb = half_to_interleaved(sd[f"{src}.attn.q_proj.bias"], hd).reshape(1, H, hd)
                kb = half_to_interleaved(_repeat_heads(sd[f"{src}.attn.k_proj.bias"], hd, n_rep), hd).reshape(1, H, hd)
                out[nm["qk_bias"]] = torch.stack([qb, kb], dim=0)
            out[nm["proj"]] = sd[f"{src}.attn.o_proj.weight"]
            out[nm["fc"]] = torch.cat([sd[f"{src}.mlp.gate_proj.weight"], sd[f"{src}.mlp.up_proj.weight"]], dim=0)
            out[nm["mlp_proj"]] = sd[f"{src}.mlp.down_proj.weight"]
    out["transformer.adapter.weight"] = sd["adapter.weight"]
    out["transformer.ln_f.weight"] = sd["final_norm.weight"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    out["freqs_cis"] = raven_freqs_cis(hd, m.max_seq_len, m.rope_base)
    return config, out
