"""Huginn (huginn_raven) import/export: logits against raven's published forward, round trips.

The checkpoint is written here in the exact raven layout (tensor names and shapes of
`recpre/raven_modeling_minimal.py`, config keys of `RavenConfig` including the derived ones
HF serialises), and `raven_forward` re-implements raven's equations directly on those tensors:
fused Wqkv, per-head qk_bias before RoPE, interleaved ("complex-like") RoPE, fused gated MLP,
sandwich norms, adapter on cat(state, embeddings), ln_f applied after the recurrence *and*
after the coda, embeddings scaled by sqrt(n_embd).
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from stars_scale.cli.convert import main as convert_main
from stars_scale.convert import export_checkpoint, import_checkpoint, load_converted, load_converted_run
from stars_scale.errors import UserError
from stars_scale.model.looped import LoopedLM

H, HEADS, INTER, VOCAB, T_MAX = 32, 4, 48, 64, 32
N_PRE, N_CORE, N_CODA = 2, 2, 1


def raven_config(tie: bool = True, dtype: str = "float32") -> dict:
    n_layers = N_PRE + N_CORE + N_CODA
    mean_rec, backprop = 4, 2
    eff = N_PRE + N_CODA + N_CORE * mean_rec
    return {
        "architectures": ["RavenForCausalLM"], "model_type": "huginn_raven",
        "n_embd": H, "n_heads": HEADS, "n_layers": n_layers, "block_size": T_MAX,
        "vocab_size": VOCAB, "padded_vocab_size": VOCAB, "padding_multiple": 4096,
        "tie_embeddings": tie, "tie_word_embeddings": tie, "intermediate_size": INTER, "bias": False,
        "architecture_class_name": "RecurrentGPT", "block_class_name": "SandwichBlock",
        "norm_class_name": "RMSNorm_llama", "norm_eps": 1e-6, "mlp_class_name": "GatedMLP",
        "nonlin_name": "SiLU", "init_strategy": "takase", "init_orthogonal": False,
        "state_init": "like-init", "injection_type": "linear",
        "n_layers_in_recurrent_block": N_CORE, "mean_recurrence": mean_rec,
        "sampling_scheme": "poisson-lognormal-filling", "mean_backprop_depth": backprop,
        "n_layers_in_prelude": N_PRE, "n_layers_in_coda": N_CODA, "qk_bias": True,
        "activation_checkpoint_impl": "per-iteration", "rope_base": 50000.0, "torch_dtype": dtype,
        # derived attributes RavenConfig sets and HF writes into config.json
        "num_key_value_heads": HEADS, "num_attention_heads": HEADS, "head_dim": H // HEADS,
        "effective_expected_depth": eff,
        "init_values": {"std": math.sqrt(2 / (5 * H)),
                        "out_proj": math.sqrt(2 / (5 * H)) / math.sqrt(2 * eff),
                        "embedding": math.sqrt(2 / (5 * H)), "embed_scale": math.sqrt(H)},
    }


def raven_freqs_cis(dim: int, end: int, theta: float) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    t = torch.arange(end, dtype=torch.float32)
    freqs = torch.outer(t, inv).float()
    return torch.stack([torch.cos(freqs)[None, :, None, :], torch.sin(freqs)[None, :, None, :]], dim=4)


def raven_weights(seed: int = 0, tie: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    hd = H // HEADS
    w = {"transformer.wte.weight": rnd(VOCAB, H, std=0.1)}
    parts = [("prelude", N_PRE), ("core_block", N_CORE), ("coda", N_CODA)]
    for part, n in parts:
        for i in range(n):
            p = f"transformer.{part}.{i}"
            for j in (1, 2, 3, 4):
                w[f"{p}.norm_{j}.weight"] = 1.0 + rnd(H, std=0.1)
            w[f"{p}.attn.Wqkv.weight"] = rnd(3 * H, H)
            w[f"{p}.attn.qk_bias"] = rnd(2, 1, HEADS, hd, std=0.1)
            w[f"{p}.attn.proj.weight"] = rnd(H, H)
            w[f"{p}.mlp.fc.weight"] = rnd(2 * INTER, H)
            w[f"{p}.mlp.proj.weight"] = rnd(H, INTER)
    w["transformer.adapter.weight"] = rnd(H, 2 * H)
    w["transformer.ln_f.weight"] = 1.0 + rnd(H, std=0.1)
    if not tie:
        w["lm_head.weight"] = rnd(VOCAB, H, std=0.1)
    w["freqs_cis"] = raven_freqs_cis(hd, T_MAX, 50000.0)
    return w


def write_raven(d: Path, weights: dict, config: dict, shards: int = 1) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    names = list(weights)
    if shards == 1:
        save_file(weights, str(d / "model.safetensors"))
        return d
    per = math.ceil(len(names) / shards)
    wmap = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: weights[n] for n in names[s * per:(s + 1) * per]}
        save_file(chunk, str(d / fname))
        wmap.update({n: fname for n in chunk})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return d


# ---------------------------------------------------------------- raven's forward, re-implemented


def _rms(x, w, eps=1e-6):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def _rope_complex_like(q, k, fc):
    qk = torch.cat([q, k], dim=2).unflatten(dim=-1, sizes=(-1, 2)).float()
    rot = torch.stack([qk[..., 0] * fc[..., 0] - qk[..., 1] * fc[..., 1],
                       qk[..., 1] * fc[..., 0] + qk[..., 0] * fc[..., 1]], -1).flatten(3)
    return torch.split(rot.type_as(q), q.shape[2], dim=2)


def _block(w, p, x, fc):
    B, S, E = x.shape
    hd = E // HEADS
    y = _rms(x, w[f"{p}.norm_1.weight"])
    q, k, v = (y @ w[f"{p}.attn.Wqkv.weight"].T).split([E, hd * HEADS, hd * HEADS], dim=2)
    q, k, v = (t.view(B, S, HEADS, hd) for t in (q, k, v))
    qb, kb = w[f"{p}.attn.qk_bias"].split(1, dim=0)
    q, k = q + qb, k + kb
    q, k = _rope_complex_like(q, k, fc)
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True)
    a = a.transpose(1, 2).reshape(B, S, E) @ w[f"{p}.attn.proj.weight"].T
    x = _rms(a + x, w[f"{p}.norm_2.weight"])
    g, u = (_rms(x, w[f"{p}.norm_3.weight"]) @ w[f"{p}.mlp.fc.weight"].T).chunk(2, dim=-1)
    m = (F.silu(g) * u) @ w[f"{p}.mlp.proj.weight"].T
    return _rms(m + x, w[f"{p}.norm_4.weight"])


def raven_forward(w, ids, x0, steps, tie=True):
    fc = w["freqs_cis"][:, : ids.shape[1]]
    e = w["transformer.wte.weight"][ids] * math.sqrt(H)
    for i in range(N_PRE):
        e = _block(w, f"transformer.prelude.{i}", e, fc)
    x = x0
    for _ in range(steps):
        x = torch.cat([x, e], dim=-1) @ w["transformer.adapter.weight"].T
        for i in range(N_CORE):
            x = _block(w, f"transformer.core_block.{i}", x, fc)
    x = _rms(x, w["transformer.ln_f.weight"])
    for i in range(N_CODA):
        x = _block(w, f"transformer.coda.{i}", x, fc)
    x = _rms(x, w["transformer.ln_f.weight"])
    head = w["transformer.wte.weight"] if tie else w["lm_head.weight"]
    return (x @ head.T).float()


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("tie,shards", [(True, 2), (False, 1)])
def test_huginn_logits_match_raven_at_several_depths(tmp_path, tie, shards):
    w = raven_weights(tie=tie)
    src = write_raven(tmp_path / "raven", w, raven_config(tie=tie), shards=shards)
    import_checkpoint("huginn", src, tmp_path / "ckpt")
    cfg, sd = load_converted(tmp_path / "ckpt")
    model = LoopedLM(cfg)
    model.load_state_dict(sd)  # strict: every tensor accounted for
    model.eval()
    assert cfg.embed_scale == pytest.approx(math.sqrt(H))
    assert model.init_state_std == pytest.approx(math.sqrt(2 / (5 * H)) * math.sqrt(H))

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    x0 = torch.randn(2, 12, H, generator=g) * model.init_state_std  # a fixed initial state
    with torch.no_grad():
        e = model.encode(ids)
        for steps in (0, 1, 3, 6):
            ours = model.decode(model.recur(x0, e, n_free=steps, n_grad=0))
            ref = raven_forward(w, ids, x0, steps, tie=tie)
            assert ref.abs().max() > 0.1  # a non-trivial comparison
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_huginn_depth_schedule_is_imported(tmp_path):
    src = write_raven(tmp_path / "raven", raven_weights(), raven_config())
    import_checkpoint("huginn", src, tmp_path / "ckpt")
    run, _ = load_converted_run(tmp_path / "ckpt")
    d = run.depth
    assert (d.dist, d.mean, d.sigma, d.backprop, d.eval_depth) == ("poisson-lognormal", 4.0, 0.5, 2, 4)
    m = run.model
    assert (m.n_prelude, m.n_core, m.n_coda, m.injection, m.pre_coda_norm, m.qkv_bias) == \
        (N_PRE, N_CORE, N_CODA, "concat-linear", True, "qk")


def test_huginn_export_import_is_bit_exact(tmp_path):
    cfg = raven_config(dtype="bfloat16")
    w = {k: (v if k == "freqs_cis" else v.to(torch.bfloat16)) for k, v in raven_weights(seed=3).items()}
    src = write_raven(tmp_path / "raven", w, cfg)
    assert convert_main(["import", "--from", "huginn", str(src), "--out", str(tmp_path / "a")]) == 0
    # export with tiny shards: the index path is exercised too
    assert convert_main(["export", "--to", "huginn", str(tmp_path / "a"), "--out", str(tmp_path / "hf"),
                         "--max-shard-size", "20KB"]) == 0
    out = tmp_path / "hf"
    assert (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    back = {}
    for fname in sorted(set(index["weight_map"].values())):
        back.update(load_file(str(out / fname)))
    assert set(back) == set(w)
    for name, t in w.items():
        assert back[name].dtype == t.dtype, name
        assert torch.equal(back[name], t), name  # the raven tensors themselves, bit for bit
    exported_cfg = json.loads((out / "config.json").read_text())
    for key in ("n_embd", "n_heads", "n_layers", "block_size", "vocab_size", "intermediate_size",
                "n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda", "qk_bias",
                "rope_base", "mean_recurrence", "mean_backprop_depth", "tie_embeddings", "norm_eps",
                "init_values", "effective_expected_depth", "model_type"):
        assert exported_cfg[key] == cfg[key], key

    assert convert_main(["import", "--from", "huginn", str(out), "--out", str(tmp_path / "b")]) == 0
    run_a, sd_a = load_converted_run(tmp_path / "a")
    run_b, sd_b = load_converted_run(tmp_path / "b")
    assert run_a.model == run_b.model and run_a.depth == run_b.depth
    assert set(sd_a) == set(sd_b)
    for name in sd_a:
        assert sd_a[name].dtype == torch.bfloat16 and torch.equal(sd_a[name], sd_b[name]), name


def test_export_writes_model_card_with_depth_scaling(tmp_path):
    src = write_raven(tmp_path / "raven", raven_weights(), raven_config())
    import_checkpoint("huginn", src, tmp_path / "ckpt")
    scaling = {"depths": [1, 4, 16], "accuracy": [0.1, 0.5, 0.75], "loss": [3.2, 2.1, 1.9],
               "rho": [0.9, 0.8, None], "delta_h": [1.5, 0.2, 0.01]}
    (tmp_path / "ckpt" / "depth_scaling.json").write_text(json.dumps(scaling))
    export_checkpoint(tmp_path / "ckpt", "huginn", tmp_path / "hf", name="tiny-huginn")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("# tiny-huginn")
    assert "| depth | accuracy | loss | ρ̂ | ‖Δh‖ |" in card
    assert "| 16 | 0.75 | 1.9 | – | 0.01 |" in card
    assert "dist: poisson-lognormal" in card  # the training config, as YAML
    assert json.loads((tmp_path / "hf" / "depth_scaling.json").read_text()) == scaling


# ---------------------------------------------------------------- upstream loading, generation


class RavenConfigStandIn:
    """How upstream `RavenConfig(**config_json)` binds keys (seal-rg/recurrent-pretraining
    recpre/raven_config_minimal.py, for transformers 4.x): named parameters, derived attributes
    set in __init__, then `PretrainedConfig.__init__(tie_word_embeddings=tie_embeddings, **kwargs)`
    which sets every remaining key as an attribute."""

    PARAMS = ("n_embd", "n_heads", "n_layers", "block_size", "vocab_size", "padding_multiple", "tie_embeddings",
              "intermediate_size", "bias", "architecture_class_name", "block_class_name", "norm_class_name",
              "norm_eps", "mlp_class_name", "nonlin_name", "init_strategy", "init_orthogonal", "state_init",
              "injection_type", "n_layers_in_recurrent_block", "mean_recurrence", "sampling_scheme",
              "mean_backprop_depth", "n_layers_in_prelude", "n_layers_in_coda", "qk_bias",
              "activation_checkpoint_impl", "rope_base", "torch_dtype", "transformers_version")

    def __init__(self, **cfg):
        named = {k: cfg.pop(k) for k in self.PARAMS if k in cfg}
        for k, v in named.items():
            setattr(self, k, v)
        self.padded_vocab_size = named["vocab_size"]
        self._pretrained_init(tie_word_embeddings=named.get("tie_embeddings", True), **cfg)

    def _pretrained_init(self, tie_word_embeddings, **kwargs):  # the duplicate key raises here
        self.tie_word_embeddings = tie_word_embeddings
        for k, v in kwargs.items():
            setattr(self, k, v)


@pytest.mark.parametrize("tie", [True, False])
def test_huginn_export_config_binds_like_raven_config(tmp_path, tie):
    src = write_raven(tmp_path / "raven", raven_weights(tie=tie), raven_config(tie=tie))
    import_checkpoint("huginn", src, tmp_path / "ckpt")
    export_checkpoint(tmp_path / "ckpt", "huginn", tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "tie_word_embeddings" not in exported  # RavenConfig passes it itself
    with pytest.raises(TypeError, match="multiple values"):  # what the old export did
        RavenConfigStandIn(**{**exported, "tie_word_embeddings": tie})
    rc = RavenConfigStandIn(**exported)
    assert rc.tie_word_embeddings is tie and rc.padded_vocab_size == VOCAB == rc.vocab_size
    assert rc.padding_multiple == 64 and VOCAB % rc.padding_multiple == 0  # not a hard-coded 4096
    assert (rc.n_embd, rc.n_heads, rc.num_key_value_heads, rc.head_dim) == (H, HEADS, HEADS, H // HEADS)
    assert rc.init_values["embed_scale"] == pytest.approx(math.sqrt(H))


def test_huginn_import_checks_the_stored_freqs_cis(tmp_path):
    w = raven_weights()
    w["freqs_cis"] = raven_freqs_cis(H // HEADS, T_MAX, 10000.0)  # another RoPE base than config.json
    src = write_raven(tmp_path / "a", w, raven_config())
    with pytest.raises(Exception, match=r"freqs_cis .*rope_base=50000.*max \|d\| = "):
        import_checkpoint("huginn", src, tmp_path / "ca")
    w["freqs_cis"] = raven_freqs_cis(H // HEADS, T_MAX, 50000.0) + 1e-4  # device-level noise: warn
    src = write_raven(tmp_path / "b", w, raven_config())
    with pytest.warns(UserWarning, match=r"max \|d\| = 0.0001"):
        import_checkpoint("huginn", src, tmp_path / "cb")
    w["freqs_cis"] = raven_freqs_cis(H // HEADS, T_MAX, 50000.0).to(torch.bfloat16)  # rounding only: silent
    src = write_raven(tmp_path / "c", w, raven_config())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import_checkpoint("huginn", src, tmp_path / "cc")


def test_exported_huginn_greedy_tokens_match_raven_reference(tmp_path):
    """Our generator (KV cache across loops) on the re-imported export == raven's forward
    recomputed on the exported tensors, token by token (fixed initial state, as raven at eval)."""
    from stars_scale.generate import generate

    src = write_raven(tmp_path / "raven", raven_weights(seed=5), raven_config())
    import_checkpoint("huginn", src, tmp_path / "a")
    export_checkpoint(tmp_path / "a", "huginn", tmp_path / "hf")
    import_checkpoint("huginn", tmp_path / "hf", tmp_path / "b")
    w = load_file(str(tmp_path / "hf" / "model.safetensors"))
    cfg, sd = load_converted(tmp_path / "b")
    model = LoopedLM(cfg)
    model.load_state_dict(sd)
    model.init_state = lambda e, generator=None: torch.zeros_like(e)  # raven's x0, fixed to zero here
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    depth, n_new = 3, 10
    seq = ids
    with torch.no_grad():
        for _ in range(n_new):
            x0 = torch.zeros(seq.shape[0], seq.shape[1], H)
            nxt = raven_forward(w, seq, x0, depth)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    res = generate(model, ids, max_new_tokens=n_new, depth=depth)
    assert len(set(seq[:, 6:].flatten().tolist())) > 2
    assert torch.equal(res.tokens, seq)


# ---------------------------------------------------------------- what upstream runs, from its config.json


def upstream_forward(config: dict, w: dict, ids, x0, steps):
    """RavenForCausalLM's forward as upstream builds it from config.json (seal-rg/recurrent-pretraining,
    recpre/raven_modeling_minimal.py): heads from n_heads, k/v heads from num_key_value_heads, the fused
    Wqkv split [n_embd, kv*hd, kv*hd], qk_bias when config says so, SDPA called without enable_gqa (no
    grouped-query path: fewer k/v heads fail there), embeddings times sqrt(n_embd) whatever
    init_values.embed_scale says (`emb_scale` is derived from n_embd alone), ln_f used twice."""
    E, heads = config["n_embd"], config["n_heads"]
    kv, hd, eps = config.get("num_key_value_heads", heads), E // heads, config["norm_eps"]

    def block(p, x, fc):
        B, S, _ = x.shape
        y = _rms(x, w[f"{p}.norm_1.weight"], eps)
        q, k, v = (y @ w[f"{p}.attn.Wqkv.weight"].T).split([E, kv * hd, kv * hd], dim=2)
        q, k, v = q.view(B, S, heads, hd), k.view(B, S, kv, hd), v.view(B, S, kv, hd)
        if config.get("qk_bias", True):
            qb, kb = w[f"{p}.attn.qk_bias"].split(1, dim=0)
            q, k = q + qb, k + kb
        q, k = _rope_complex_like(q, k, fc)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = _rms(a.transpose(1, 2).reshape(B, S, E) @ w[f"{p}.attn.proj.weight"].T + x, w[f"{p}.norm_2.weight"], eps)
        g, u = (_rms(x, w[f"{p}.norm_3.weight"], eps) @ w[f"{p}.mlp.fc.weight"].T).chunk(2, dim=-1)
        return _rms((F.silu(g) * u) @ w[f"{p}.mlp.proj.weight"].T + x, w[f"{p}.norm_4.weight"], eps)

    fc = w["freqs_cis"][:, : ids.shape[1]]
    e = w["transformer.wte.weight"][ids] * math.sqrt(E)
    for i in range(config["n_layers_in_prelude"]):
        e = block(f"transformer.prelude.{i}", e, fc)
    x = x0
    for _ in range(steps):
        x = torch.cat([x, e], dim=-1) @ w["transformer.adapter.weight"].T
        for i in range(config["n_layers_in_recurrent_block"]):
            x = block(f"transformer.core_block.{i}", x, fc)
    x = _rms(x, w["transformer.ln_f.weight"], eps)
    for i in range(config["n_layers_in_coda"]):
        x = block(f"transformer.coda.{i}", x, fc)
    x = _rms(x, w["transformer.ln_f.weight"], eps)
    head = w["transformer.wte.weight"] if config.get("tie_embeddings", True) else w["lm_head.weight"]
    return (x @ head.T).float()


def huginn_shaped(tmp: Path, hidden: int = H, kv_heads: int | None = None, qkv_bias: str = "qk", tie: bool = True,
                  embed_scale: float | None = None, seed: int = 0) -> tuple[Path, LoopedLM]:
    """A LoopedLM of raven's shape (random weights, norms perturbed) saved as a converted checkpoint."""
    from stars_scale.config import ModelConfig, RunConfig
    from stars_scale.convert.checkpoint import save_converted

    cfg = ModelConfig(vocab_size=VOCAB, hidden=hidden, heads=HEADS, kv_heads=kv_heads, mlp="swiglu", mlp_hidden=INTER,
                      norm="rmsnorm", norm_eps=1e-6, norm_placement="sandwich", positions="rope", rope_base=50000.0,
                      max_seq_len=T_MAX, n_prelude=N_PRE, n_core=N_CORE, n_coda=N_CODA, injection="concat-linear",
                      init_state="random", final_norm=True, pre_coda_norm=True, tie_embeddings=tie,
                      embed_scale=math.sqrt(hidden) if embed_scale is None else embed_scale, bias=False,
                      qkv_bias=qkv_bias)
    torch.manual_seed(seed)
    model = LoopedLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_converted(tmp / "ckpt", RunConfig(model=cfg), model.state_dict(), {})
    return tmp / "ckpt", model.eval()


def upstream_matches(model: LoopedLM, hf: Path) -> dict:
    config = json.loads((hf / "config.json").read_text())
    w = load_file(str(hf / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    x0 = torch.randn(2, 12, model.cfg.hidden, generator=g) * model.init_state_std
    with torch.no_grad():
        e = model.encode(ids)
        for steps in (1, 3):
            ours = model.decode(model.recur(x0, e, n_free=steps, n_grad=0))
            ref = upstream_forward(config, w, ids, x0, steps)
            assert ref.abs().max() > 0.1
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # fp32, same operations up to order
    # raven's s_0: trunc_normal(init_values.std) * sqrt(n_embd): the same distribution as ours
    assert config["init_values"]["std"] * math.sqrt(config["n_embd"]) == pytest.approx(model.init_state_std, rel=1e-12)
    return config


def test_upstream_stand_in_is_raven_forward(tmp_path):
    """The config-driven stand-in is the file's raven_forward on raven's own config and weights."""
    w, cfg = raven_weights(seed=4), raven_config()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(2, 9, H, generator=torch.Generator().manual_seed(1))
    assert torch.equal(upstream_forward(cfg, w, ids, x0, 3), raven_forward(w, ids, x0, 3))


@pytest.mark.parametrize("qkv_bias", ["qk", "none"])
def test_gqa_model_exports_as_full_heads_that_upstream_runs(tmp_path, qkv_bias):
    ckpt, model = huginn_shaped(tmp_path, kv_heads=2, qkv_bias=qkv_bias)
    export_checkpoint(ckpt, "huginn", tmp_path / "hf")
    config = upstream_matches(model, tmp_path / "hf")
    assert config["num_key_value_heads"] == config["n_heads"] == HEADS
    import_checkpoint("huginn", tmp_path / "hf", tmp_path / "back")  # and it comes back (as MHA)
    assert load_converted(tmp_path / "back")[0].kv_heads is None


def test_untied_model_with_another_embed_scale_is_rescaled_exactly(tmp_path):
    """hidden 64: sqrt = 8, embed_scale 1 -> the embedding is stored divided by 8 (exact) and raven's
    x8 gives back the same products; the state std is written so raven's s_0 has ours."""
    ckpt, model = huginn_shaped(tmp_path, hidden=64, tie=False, embed_scale=1.0)
    export_checkpoint(ckpt, "huginn", tmp_path / "hf")
    config = upstream_matches(model, tmp_path / "hf")
    assert config["init_values"]["embed_scale"] == 8.0
    w = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(w["transformer.wte.weight"] * 8, model.embed.weight)


@pytest.mark.parametrize("hidden,tie,why", [(H, True, "tie_embeddings"), (64, True, "tie_embeddings"),
                                            (H, False, "not a power of two")])
def test_export_refuses_an_embed_scale_raven_would_ignore(tmp_path, hidden, tie, why):
    ckpt, _ = huginn_shaped(tmp_path, hidden=hidden, tie=tie, embed_scale=1.0)
    res = subprocess.run([sys.executable, "-m", "stars_scale.cli.convert", "export", "--to", "huginn", str(ckpt),
                          "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1, res.stderr[-2000:]
    assert "model.embed_scale is 1" in err[0] and f"sqrt(hidden) = {math.sqrt(hidden):g}" in err[0], err[0]
    assert why in err[0]
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("edit,field", [
    ({"init_values": {**raven_config()["init_values"], "embed_scale": 1.0}}, "init_values.embed_scale=1"),
    ({"num_key_value_heads": 2, "qk_bias": False}, "num_key_value_heads 2 != n_heads 4"),
    ({"num_attention_heads": 8}, "num_attention_heads=8 and n_heads=4 disagree"),
    ({"hidden_size": 64}, "hidden_size=64 and n_embd=32 disagree"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False but raven reads tie_embeddings=True"),
])
def test_import_refuses_a_config_raven_reads_otherwise(tmp_path, edit, field):
    w = raven_weights()
    if edit.get("num_key_value_heads") == 2:  # weights shaped as the config says
        hd = H // HEADS
        for k in [k for k in w if k.endswith("Wqkv.weight")]:
            w[k] = w[k][: (HEADS + 4) * hd]
        for k in [k for k in w if k.endswith("qk_bias")]:
            del w[k]
    src = write_raven(tmp_path / "raven", w, {**raven_config(), **edit})
    assert convert_main(["import", "--from", "huginn", str(src), "--out", str(tmp_path / "c")]) == 2
    with pytest.raises(UserError, match=re.escape(field)):
        import_checkpoint("huginn", src, tmp_path / "c")
    assert not (tmp_path / "c").exists()
