"""The looped (recurrent-depth) language model.

    e   = prelude(embed(tokens))                       # once
    s_0 = init_state(e)                                # zero | embed | random
    s_t = core(inject(s_{t-1}, e))   for t = 1..r       # r = n_free + n_grad, shared weights
    y   = head(final_norm(coda(s_r)))

The first `n_free` iterations run without gradient (truncated BPTT), the last `n_grad` with it;
`grad_scale=(n, f)` multiplies the gradient reaching the state after iteration n by f (the
progressive loss of Bansal et al. 2022 in one pass: see `stars.objective`).
Depth is always an explicit argument of `forward`; the model holds no depth state.
Activation checkpointing (`model.checkpointing = "loop" | "block"`) recomputes every
gradient-carrying iteration (or block) in backward so activation memory does not grow with r.

A plain single-device module: `stars_scale.parallel` applies tensor/pipeline parallelism to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from stars_scale import kernels
from stars_scale.config import ModelConfig
from stars_scale.model.dropout import Dropout
from stars_scale.model.layers import Block, make_norm, rope_cache


@dataclass
class LoopOutput:
    logits: torch.Tensor
    state: torch.Tensor  # s_r, the end state the coda reads (carries graph for the grad iterations)
    embedded: torch.Tensor  # e, the prelude output every iteration is conditioned on
    states: Optional[list[torch.Tensor]] = None  # [s_0, ..., s_r] detached, when asked for


class _ScaleGrad(torch.autograd.Function):
    """Identity forward (bit for bit); the gradient times `factor` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g * ctx.factor, None


class LoopedLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.injection == "none" and cfg.init_state != "embed":
            raise ValueError("model.injection=none needs model.init_state=embed "
                             "(otherwise the input never reaches the recurrence)")
        kernels.check_mode(cfg.kernels)  # model.kernels=cuda without the built extension: one clear line
        self.cfg = cfg
        h = cfg.hidden
        self.embed = nn.Embedding(cfg.vocab_size, h)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, h) if cfg.positions == "learned" else None
        if cfg.positions == "rope":
            cos, sin = rope_cache(h // cfg.heads, cfg.max_seq_len, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = Dropout(cfg.dropout)
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        self.adapter = nn.Linear(2 * h, h, bias=cfg.bias) if cfg.injection == "concat-linear" else None
        self.core = nn.ModuleList(Block(cfg) for _ in range(cfg.n_core))
        self.state_norm = make_norm(cfg) if cfg.state_norm else None
        self.coda = nn.ModuleList(Block(cfg) for _ in range(cfg.n_coda))
        self.final_norm = make_norm(cfg) if cfg.final_norm else None
        self.lm_head = nn.Linear(h, cfg.vocab_size, bias=False)
        self.exit_gate = nn.Linear(h, 1, bias=True) if cfg.exit_gate else None
        self.checkpointing = "none"  # set by the trainer: none | loop | block
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # ------------------------------------------------------------------ init

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = self.cfg.embed_init_std if isinstance(module, nn.Embedding) else None
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std if std is None else std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "regroup_after_init"):  # after its fused qkv_proj (children come first)
            module.regroup_after_init()

    @property
    def init_state_std(self) -> float:
        if self.cfg.init_state_std is not None:
            return self.cfg.init_state_std
        # Huginn: trunc-normal with std sqrt(2 / (5 h)), then the embedding scale (~0.63 at sqrt(h))
        return math.sqrt(2.0 / (5.0 * self.cfg.hidden)) * self.cfg.embed_scale

    # ------------------------------------------------------------------ pieces

    def rope(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.rope_cos, self.rope_sin) if self.cfg.positions == "rope" else None

    def _block(self, block: nn.Module, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        if kv_cache is not None:  # generation (stars_scale.generate): inference only
            return block(x, self.rope(), kv_cache)
        if self.checkpointing == "block" and torch.is_grad_enabled() and self.training:
            return checkpoint(block, x, self.rope(), use_reentrant=False)
        return block(x, self.rope())

    def embed_tokens(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Token (+ learned position) embeddings of positions offset .. offset + T - 1."""
        T = input_ids.shape[1]
        if offset + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {offset + T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(input_ids)
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(offset, offset + T, device=input_ids.device))
        return self.drop(x)

    def encode(self, input_ids: torch.Tensor, kv_cache=None, offset: int = 0) -> torch.Tensor:
        """Tokens -> e, the prelude's output. With `kv_cache` (one entry per prelude block) the
        tokens are positions offset.. of a sequence whose earlier keys/values are cached."""
        x = self.embed_tokens(input_ids, offset)
        for i, block in enumerate(self.prelude):
            x = self._block(block, x, None if kv_cache is None else kv_cache[i])
        return x

    def init_state(self, e: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        kind = self.cfg.init_state
        if kind == "embed":
            return e
        if kind == "zero":
            return torch.zeros_like(e)
        std = self.init_state_std
        s = torch.empty(e.shape, dtype=torch.float32, device=e.device)
        nn.init.trunc_normal_(s, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        return s.to(e.dtype)

    def inject(self, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        kind = self.cfg.injection
        if kind == "concat-linear":
            return self.adapter(torch.cat([s, e], dim=-1))
        if kind == "add":
            return s + e
        return s

    def core_step(self, s: torch.Tensor, e: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """The core map f(s, e): one loop iteration. STARS regularises its Jacobian in s.
        `kv_cache`: one entry per core block, for this iteration (generation)."""
        x = self.inject(s, e)
        for i, block in enumerate(self.core):
            x = self._block(block, x, None if kv_cache is None else kv_cache[i])
        if self.state_norm is not None:
            x = self.state_norm(x)
        return x

    def loop_step(self, s: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        """One loop iteration as training runs it: recomputed in backward under loop checkpointing."""
        if self.checkpointing == "loop" and torch.is_grad_enabled() and self.training:
            return checkpoint(self.core_step, s, e, use_reentrant=False)
        return self.core_step(s, e)

    def decode(self, s: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """End state -> logits: coda blocks, final norm, head. `kv_cache`: one per coda block."""
        x = s
        if self.cfg.pre_coda_norm:  # Huginn: the final norm's weights, applied before the coda too
            x = self.final_norm(x)
        for i, block in enumerate(self.coda):
            x = self._block(block, x, None if kv_cache is None else kv_cache[i])
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.lm_head(x)

    def recur(self, s: torch.Tensor, e: torch.Tensor, n_free: int, n_grad: int,
              states: list[torch.Tensor] | None = None,
              grad_scale: tuple[int, float] | None = None) -> torch.Tensor:
        """Run n_free iterations without gradient, then n_grad with it. `grad_scale=(n, f)`: the
        gradient into the state after iteration n (0: s_0) is multiplied by f, so iterations 1..n
        (and what feeds s_0) learn at f times the rate of the later ones; the values are unchanged."""
        if n_free < 0 or n_grad < 0:
            raise ValueError(f"depth must be non-negative, got n_free={n_free}, n_grad={n_grad}")
        at, factor = grad_scale if grad_scale is not None else (-1, 1.0)
        if n_free <= at < n_free + n_grad and factor != 1.0:  # only where a gradient flows on
            s = self.recur(s, e, n_free, at - n_free, states)
            return self.recur(_ScaleGrad.apply(s, factor), e, 0, n_free + n_grad - at, states)
        if n_free:
            with torch.no_grad():
                for _ in range(n_free):
                    s = self.core_step(s, e)
                    if states is not None:
                        states.append(s.detach())
            s = s.detach()
        for _ in range(n_grad):
            s = self.loop_step(s, e)
            if states is not None:
                states.append(s.detach())
        return s

    def exit_logits(self, s: torch.Tensor) -> torch.Tensor:
        """Ouro's early-exit gate on a state s_t: [B, T, 1] logits of the exit probability."""
        if self.exit_gate is None:
            raise ValueError("this model has no exit gate (model.exit_gate: false)")
        return self.exit_gate(s)

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor, n_free: int = 0, n_grad: int = 1,
                return_states: bool = False, generator: torch.Generator | None = None,
                grad_scale: tuple[int, float] | None = None) -> LoopOutput:
        e = self.encode(input_ids)
        s = self.init_state(e, generator)
        states = [s.detach()] if return_states else None
        s = self.recur(s, e, n_free, n_grad, states, grad_scale)
        return LoopOutput(logits=self.decode(s), state=s, embedded=e, states=states)

    # ------------------------------------------------------------------ accounting

    def param_groups_counts(self) -> dict[str, int]:
        """Parameter counts by part (tied head counted once, in the embedding)."""
        def count(mods) -> int:
            return sum(p.numel() for m in mods if m is not None for p in m.parameters())
        counts = {
            "embedding": count([self.embed, self.pos_embed]),
            "prelude": count(self.prelude),
            "core": count([*self.core, self.adapter, self.state_norm]),
            "coda": count([*self.coda, self.final_norm]),
            "head": (0 if self.cfg.tie_embeddings else self.lm_head.weight.numel())
            + count([self.exit_gate]),
        }
        counts["total"] = sum(counts.values())
        return counts
