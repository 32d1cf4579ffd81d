"""Llama/Qwen2 retrofit: the converted looped model reproduces the (sliced) original network.

Tiny `transformers` models with random weights, built offline from a config and saved with
`save_pretrained`, are the reference: all layers as prelude with zero loops must give the
original logits; a (prelude, core, coda) selection at one loop must give the network made of
exactly those layers in that order.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from stars_scale.cli.convert import main as convert_main
from stars_scale.convert import export_checkpoint, import_checkpoint, load_converted, load_converted_run
from stars_scale.model.looped import LoopedLM

VOCAB, H, LAYERS = 96, 32, 6


def tiny_hf(kind: str, tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=64, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.1, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=500.0))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=500.0))
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


def sliced(model, layers: list[int]):
    """The original network with only `layers`, in that order (the retrofit's 1-loop target)."""
    m = copy.deepcopy(model)
    m.model.layers = torch.nn.ModuleList(m.model.layers[i] for i in layers)
    m.config.num_hidden_layers = len(layers)
    return m


def ids(batch=2, T=10, seed=5):
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def ours(ckpt, tokens, n_loops):
    cfg, sd = load_converted(ckpt)
    model = LoopedLM(cfg)
    model.load_state_dict(sd)
    model.eval()
    with torch.no_grad():
        return model(tokens, n_free=0, n_grad=n_loops).logits


@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("qwen2", False)])
def test_all_layers_as_prelude_zero_loops_reproduces_original(tmp_path, kind, tie):
    hf = tiny_hf(kind, tie)
    src = save(hf, tmp_path / "hf")
    import_checkpoint("llama", src, tmp_path / "ckpt", prelude=f"0-{LAYERS - 1}", core=str(LAYERS - 1))
    x = ids()
    with torch.no_grad():
        ref = hf(x, use_cache=False).logits
    got = ours(tmp_path / "ckpt", x, n_loops=0)
    assert ref.abs().max() > 0.1
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_slice_at_one_loop_reproduces_sliced_network(tmp_path, kind):
    hf = tiny_hf(kind, tie=False, seed=1)
    src = save(hf, tmp_path / "hf")
    # prelude 0, core 2-3, coda 5: layers 1 and 4 are dropped
    rc = convert_main(["import", "--from", "llama", str(src), "--out", str(tmp_path / "ckpt"),
                       "--prelude", "0", "--core", "2-3", "--coda", "5"])
    assert rc == 0
    x = ids(seed=7)
    with torch.no_grad():
        ref = sliced(hf, [0, 2, 3, 5])(x, use_cache=False).logits
        full = hf(x, use_cache=False).logits
    got = ours(tmp_path / "ckpt", x, n_loops=1)
    assert (got - ref).abs().max().item() <= 1e-5
    assert (got - full).abs().max().item() > 1e-2  # the dropped layers really are gone
    # a second loop is a different function (the state feeds back through the adapter)
    assert (ours(tmp_path / "ckpt", x, n_loops=2) - ref).abs().max().item() > 1e-3


def test_retrofit_config_and_adapter(tmp_path):
    src = save(tiny_hf("llama", tie=True), tmp_path / "hf")
    import_checkpoint("llama", src, tmp_path / "ckpt", prelude="0-1", core="2-3", coda="4-5",
                      state_weight=0.25)
    run, sd = load_converted_run(tmp_path / "ckpt")
    m = run.model
    assert (m.n_prelude, m.n_core, m.n_coda, m.injection, m.init_state, m.norm_placement) == \
        (2, 2, 2, "concat-linear", "embed", "pre")
    assert m.tie_embeddings and sd["lm_head.weight"] is sd["embed.weight"]
    eye = torch.eye(H)
    assert torch.equal(sd["adapter.weight"], torch.cat([0.25 * eye, 0.75 * eye], dim=1))


def test_retrofit_exports_to_hf_and_back_bit_exact(tmp_path):
    src = save(tiny_hf("qwen2", tie=False), tmp_path / "hf")
    import_checkpoint("llama", src, tmp_path / "a", prelude="0", core="1-3", coda="4-5")
    export_checkpoint(tmp_path / "a", "hf", tmp_path / "out")
    import_checkpoint("hf", tmp_path / "out", tmp_path / "b")
    run_a, sd_a = load_converted_run(tmp_path / "a")
    run_b, sd_b = load_converted_run(tmp_path / "b")
    assert run_a.model == run_b.model and run_a.depth == run_b.depth
    assert set(sd_a) == set(sd_b) and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
