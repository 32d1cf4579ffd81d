"""Transformer building blocks: norms, rotary positions, attention, MLP and the block.

Plain single-device modules. Tensor parallelism replaces the `nn.Linear`s named below
(qkv/o, gate_up/down) from `stars_scale.parallel`; nothing here knows about it. The fused
projections' layouts (head-grouped QKV, `cat(gate, up)`) are described in `fused.py`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stars_scale import kernels
from stars_scale.config import ModelConfig
from stars_scale.model.attention import attend, attend_cached
from stars_scale.model.dropout import Dropout, active_masks
from stars_scale.model.fused import fuse_qkv, qkv_bias_flags, upgrade_attention_keys, upgrade_mlp_keys


class RMSNorm(nn.Module):
    """`norm(x)`, or `norm(x + residual)` in one fused kernel when `kernels` allows it."""

    def __init__(self, dim: int, eps: float = 1e-5, kernels: str = "torch"):
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if kernels.fused(self.kernels, x):
            return kernels.add_norm(x, residual, self.weight, None, self.eps, rms=True)
        z = x if residual is None else x + residual
        xf = z.to(torch.promote_types(z.dtype, torch.float32))  # fp32 statistics (fp64 stays fp64)
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(z) * self.weight


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with the same optional fused residual add as RMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, kernels: str = "torch"):
        super().__init__(dim, eps=eps, bias=bias)
        self.kernels = kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if kernels.fused(self.kernels, x):
            return kernels.add_norm(x, residual, self.weight, self.bias, self.eps, rms=False)
        return super().forward(x if residual is None else x + residual)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.hidden
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, cfg.kernels)
    return LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias, kernels=cfg.kernels)


def rope_cache(head_dim: int, max_seq_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float64)
    freqs = torch.outer(t, inv)  # [T, D/2]
    return freqs.cos().float(), freqs.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama convention) on x [B, H, T, D]; cos/sin [T, D/2]."""
    T = x.shape[-2]
    cos = torch.cat([cos[:T], cos[:T]], dim=-1).to(x.dtype)
    sin = torch.cat([sin[:T], sin[:T]], dim=-1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: str = "torch") -> torch.Tensor:
    """RoPE through the fused kernel when `mode` allows it on x, else `apply_rope`."""
    return kernels.rope(x, cos, sin) if kernels.fused(mode, x) else apply_rope(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.heads
        self.n_kv = cfg.kv_heads or cfg.heads
        self.head_dim = cfg.hidden // cfg.heads
        self.group = self.n_heads // self.n_kv  # query heads per KV group
        qk_b, v_b = qkv_bias_flags(cfg)
        # One fused projection, Megatron's head-grouped layout (see fused.py). A q/k bias
        # without a v bias (Huginn) is the separate `qk_bias` in the same grouping.
        self.qkv_proj = nn.Linear(cfg.hidden, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=v_b)
        self.qk_bias = (nn.Parameter(torch.zeros(self.n_kv, self.group + 1, self.head_dim))
                        if qk_b and not v_b else None)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden, bias=cfg.bias)
        self._register_load_state_dict_pre_hook(self._upgrade_old_layout)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.backend = cfg.attention
        self.dropout = cfg.dropout
        self.kernels = cfg.kernels

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv_cache=None) -> torch.Tensor:
        """`kv_cache` (generation): an object with `.offset` (position of x's first token) and
        `.update(k, v) -> (k_all, v_all)`; see stars_scale/generate/cache.py."""
        B, T, _ = x.shape
        if kv_cache is not None and rope is not None:  # x starts at position kv_cache.offset
            rope = (rope[0][kv_cache.offset:], rope[1][kv_cache.offset:])
        # Head counts are read off the projections so a tensor-parallel shard (fewer local
        # heads) runs the same code.
        qkv = self.qkv_proj(x).view(B, T, -1, self.group + 2, self.head_dim)
        if self.qk_bias is not None:
            qkv = qkv + F.pad(self.qk_bias, (0, 0, 0, 1))  # zero bias on v
        q, k, v = qkv.split([self.group, 1, 1], dim=3)
        q = q.reshape(B, T, -1, self.head_dim).transpose(1, 2)
        k, v = k.squeeze(3).transpose(1, 2), v.squeeze(3).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rotary(q, *rope, self.kernels), rotary(k, *rope, self.kernels)
        p = self.dropout if self.training else 0.0
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
            y = attend_cached(q, k, v, self.backend)
        else:  # the STARS probe replays its dropout masks, which only the math path can take
            y = attend(q, k, v, "math" if p > 0 and active_masks() is not None else self.backend, p)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    @torch.no_grad()
    def regroup_after_init(self) -> None:
        """Rows drawn in q, k, v order (one draw = the three separate draws of the unfused
        layout) moved into the head-grouped layout: a model from a seed has the same weights
        as before the fusion."""
        for t in (self.qkv_proj.weight, self.qkv_proj.bias):
            if t is not None:
                q, k, v = t.split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                   self.n_kv * self.head_dim])
                t.copy_(fuse_qkv(q, k, v, self.group, self.head_dim))

    def _upgrade_old_layout(self, sd, prefix, *args) -> None:
        upgrade_attention_keys(sd, prefix, self.group, self.head_dim, self.qk_bias is None)


def mlp_hidden(cfg: ModelConfig) -> int:
    if cfg.mlp_hidden is not None:
        return cfg.mlp_hidden
    if cfg.mlp == "swiglu":
        return 64 * ((int(8 * cfg.hidden / 3) + 63) // 64)
    return 4 * cfg.hidden


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inner = mlp_hidden(cfg)
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":  # one projection, output cat(gate, up) (see fused.py)
            self.gate_up_proj = nn.Linear(cfg.hidden, 2 * inner, bias=cfg.bias)
            self._register_load_state_dict_pre_hook(self._upgrade_old_layout)
        else:
            self.up_proj = nn.Linear(cfg.hidden, inner, bias=cfg.bias)
        self.down_proj = nn.Linear(inner, cfg.hidden, bias=cfg.bias)
        self.kernels = cfg.kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.fused(self.kernels, x):  # the fused activations read the cat(gate, up) layout
            if self.kind == "swiglu":
                return self.down_proj(kernels.swiglu(self.gate_up_proj(x)))
            return self.down_proj(kernels.gelu(self.up_proj(x)))
        if self.kind == "swiglu":
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(self.up_proj(x)))

    def _upgrade_old_layout(self, sd, prefix, *args) -> None:
        upgrade_mlp_keys(sd, prefix)


class Block(nn.Module):
    """One transformer block with `pre`, `sandwich` (Huginn/STARS), `post` or `peri` (Ouro) norms.

    pre:      x = x + attn(n1(x));        x = x + mlp(n2(x))
    sandwich: x = n2(x + attn(n1(x)));    x = n4(x + mlp(n3(x)))   (norm on the residual stream;
              the add and the norm are one fused kernel when model.kernels allows)
    post:     x = n1(x + attn(x));        x = n2(x + mlp(x))
    peri:     x = x + n2(attn(n1(x)));    x = x + n4(mlp(n3(x)))   (norm on each sublayer output)
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.placement = cfg.norm_placement
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.norm1 = make_norm(cfg)
        self.norm2 = make_norm(cfg)
        if self.placement in ("sandwich", "peri"):
            self.norm3 = make_norm(cfg)
            self.norm4 = make_norm(cfg)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache=None) -> torch.Tensor:
        if self.placement == "pre":
            x = x + self.drop(self.attn(self.norm1(x), rope, kv_cache))
            return x + self.drop(self.mlp(self.norm2(x)))
        if self.placement == "sandwich":
            x = self.norm2(x, self.drop(self.attn(self.norm1(x), rope, kv_cache)))
            return self.norm4(x, self.drop(self.mlp(self.norm3(x))))
        if self.placement == "peri":
            x = x + self.drop(self.norm2(self.attn(self.norm1(x), rope, kv_cache)))
            return x + self.drop(self.norm4(self.mlp(self.norm3(x))))
        x = self.norm1(x, self.drop(self.attn(x, rope, kv_cache)))
        return self.norm2(x, self.drop(self.mlp(x)))
