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
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from stars_scale.cli.convert import main as convert_main
from stars_scale.convert import export_checkpoint, import_checkpoint, load_converted, load_converted_run
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
