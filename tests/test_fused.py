"""Fused projections: head-grouped QKV and cat(gate, up) compute what separate projections do,
older (unfused) checkpoints load into the fused model with identical losses, and tensor
parallelism keeps whole KV groups and cat(gate, up) on every rank."""
import pytest
import torch
import torch.nn.functional as F

from stars_scale.config import ModelConfig
from stars_scale.model import LoopedLM
from stars_scale.model.attention import attend
from stars_scale.model.fused import (fuse_qkv, fuse_state_dict, refuse_unfused_resume, split_qkv,
                                     unfuse_state_dict)
from stars_scale.parallel.tensor import _strided, gather_shards
from stars_scale.errors import UserError


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=15, hidden=32, heads=4, max_seq_len=16, mlp_hidden=48, mlp="swiglu",
                positions="rope", norm="rmsnorm", n_prelude=1, n_core=2, n_coda=1, injection="concat-linear")
    base.update(kw)
    return ModelConfig(**base)


VARIANTS = {
    "mha": {}, "gqa": {"kv_heads": 2}, "mqa": {"kv_heads": 1},
    "qk bias (huginn)": {"bias": False, "qkv_bias": "qk"}, "qkv bias (qwen2), gqa": {"qkv_bias": "qkv", "kv_heads": 2},
    "bias, gelu": {"bias": True, "mlp": "gelu"},
}


def test_head_grouped_layout_puts_each_kv_group_together():
    hd, g, n_kv = 2, 3, 2
    q = torch.arange(n_kv * g * hd).float().unsqueeze(1)  # rows numbered: q 0..11
    k = 100 + torch.arange(n_kv * hd).float().unsqueeze(1)
    v = 200 + torch.arange(n_kv * hd).float().unsqueeze(1)
    fused = fuse_qkv(q, k, v, g, hd).squeeze(1).tolist()
    assert fused == [0, 1, 2, 3, 4, 5, 100, 101, 200, 201, 6, 7, 8, 9, 10, 11, 102, 103, 202, 203]
    back = split_qkv(fuse_qkv(q, k, v, g, hd), g, hd)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_fused_attention_and_mlp_equal_separate_projections(variant):
    torch.manual_seed(0)
    c = cfg(**variant)
    model = LoopedLM(c)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # nonzero biases too
    attn, mlp = model.core[0].attn, model.core[0].mlp
    sd = unfuse_state_dict({f"core.0.{k}": v for k, v in model.core[0].state_dict().items()}, c)
    w = {k.removeprefix("core.0."): v for k, v in sd.items()}
    x = torch.randn(2, 7, c.hidden)

    def lin(name, inp):
        return F.linear(inp, w[f"{name}.weight"], w.get(f"{name}.bias"))

    B, T, hd = 2, 7, c.hidden // c.heads
    q = lin("attn.q_proj", x).view(B, T, -1, hd).transpose(1, 2)
    k = lin("attn.k_proj", x).view(B, T, -1, hd).transpose(1, 2)
    v = lin("attn.v_proj", x).view(B, T, -1, hd).transpose(1, 2)
    rope = model.rope()
    from stars_scale.model.layers import apply_rope

    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    ref = lin("attn.o_proj", attend(q, k, v).transpose(1, 2).reshape(B, T, -1))
    assert torch.allclose(attn(x, rope), ref, atol=1e-6)
    if c.mlp == "swiglu":
        ref_mlp = lin("mlp.down_proj", F.silu(lin("mlp.gate_proj", x)) * lin("mlp.up_proj", x))
        assert torch.allclose(mlp(x), ref_mlp, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_unfused_checkpoint_loads_with_identical_losses(variant):
    torch.manual_seed(1)
    c = cfg(**variant)
    model = LoopedLM(c)
    old = unfuse_state_dict(model.state_dict(), c)  # what an older version saved
    assert any(".attn.q_proj." in k for k in old) and not any("qkv_proj" in k for k in old)
    fresh = LoopedLM(c)
    fresh.load_state_dict(old)  # strict: converted on load
    ids = torch.randint(0, 15, (3, 16))
    a, b = model(ids, n_free=1, n_grad=2).logits, fresh(ids, n_free=1, n_grad=2).logits
    assert torch.equal(a, b)
    assert fuse_state_dict(old, c).keys() == model.state_dict().keys()


def test_unfused_training_checkpoint_refuses_to_resume_in_one_line():
    c = cfg()
    old = unfuse_state_dict(LoopedLM(c).state_dict(), c)
    with pytest.raises(UserError, match="separate q/k/v and gate/up projections.*init.from: ckpt/step_00000010"):
        refuse_unfused_resume(old, "ckpt/step_00000010")
    refuse_unfused_resume(LoopedLM(c).state_dict(), "fine")  # the fused layout resumes


@pytest.mark.parametrize("tp", [2, 4])
def test_strided_shards_give_each_rank_cat_gate_up(tp):
    inter, h = 8, 3
    gate, up = torch.randn(inter, h), torch.randn(inter, h)
    full = torch.cat([gate, up])
    shards = _strided(full, 0, 2, tp).chunk(tp, dim=0)
    n = inter // tp
    for r, shard in enumerate(shards):
        assert torch.equal(shard, torch.cat([gate[r * n:(r + 1) * n], up[r * n:(r + 1) * n]]))
    assert torch.equal(gather_shards(list(shards), 0, 2), full)


@pytest.mark.parametrize("variant", [{}, {"kv_heads": 2}], ids=["mha", "gqa"])
def test_a_model_from_a_seed_has_the_weights_of_the_unfused_layout(variant, monkeypatch):
    """The fused qkv_proj is drawn in one normal_ (the same numbers as the separate q, k, v
    draws, in that order) and regrouped, so a seed gives the q/k/v weights the separate
    projections had (training runs keep their trajectory)."""
    from stars_scale.model.layers import Attention

    c = cfg(**variant)
    torch.manual_seed(0)
    sd = unfuse_state_dict(LoopedLM(c).state_dict(), c)
    monkeypatch.setattr(Attention, "regroup_after_init", lambda self: None)
    torch.manual_seed(0)
    raw = LoopedLM(c).state_dict()["prelude.0.attn.qkv_proj.weight"]  # rows as drawn: q, k, v
    hd, kv = c.hidden // c.heads, c.kv_heads or c.heads
    q, k, v = raw.split([c.heads * hd, kv * hd, kv * hd])
    assert torch.equal(sd["prelude.0.attn.q_proj.weight"], q)
    assert torch.equal(sd["prelude.0.attn.k_proj.weight"], k)
    assert torch.equal(sd["prelude.0.attn.v_proj.weight"], v)
    torch.manual_seed(0)
    a = torch.empty(3 * 32, 32).normal_()
    torch.manual_seed(0)
    assert torch.equal(a, torch.cat([torch.empty(32, 32).normal_() for _ in range(3)]))  # one draw = three
