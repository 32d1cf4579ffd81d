"""Counting for the planner: parameters exactly as `LoopedLM` builds them, the configured depth
sampler's statistics, and FLOPs per token (the loops counted, recompute excluded)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stars_scale.config import ModelConfig, RunConfig
from stars_scale.model.layers import mlp_hidden as _mlp_hidden
from stars_scale.stars.depth import DepthSampler


def _norm_params(m: ModelConfig) -> int:
    if m.norm == "rmsnorm":
        return m.hidden
    return m.hidden * (2 if m.bias else 1)


def _qkv_bias(m: ModelConfig) -> tuple[bool, bool]:
    if m.qkv_bias is None:
        return m.bias, m.bias
    return m.qkv_bias in ("qk", "qkv"), m.qkv_bias == "qkv"


@dataclass(frozen=True)
class BlockParams:
    sharded: int  # split by tensor parallelism (projection matrices and their column biases)
    replicated: int  # norms, row-parallel biases, qk-norm weights

    @property
    def total(self) -> int:
        return self.sharded + self.replicated


def block_params(m: ModelConfig) -> BlockParams:
    h, hd = m.hidden, m.hidden // m.heads
    kvd = (m.kv_heads or m.heads) * hd
    inter = _mlp_hidden(m)
    qk_b, v_b = _qkv_bias(m)
    sharded = h * h + 2 * h * kvd + h * h  # q, k, v, o
    sharded += (h + kvd if qk_b else 0) + (kvd if v_b else 0)
    replicated = h if m.bias else 0  # o_proj bias
    if m.mlp == "swiglu":
        sharded += 3 * h * inter + (2 * inter if m.bias else 0)
    else:
        sharded += 2 * h * inter + (inter if m.bias else 0)
    replicated += h if m.bias else 0  # down_proj bias
    if m.qk_norm:
        replicated += 2 * hd
    n_norms = 4 if m.norm_placement in ("sandwich", "peri") else 2
    replicated += n_norms * _norm_params(m)
    return BlockParams(sharded, replicated)


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    prelude: int
    core: int
    coda: int
    head: int
    block: BlockParams
    adapter: int
    state_norm: int
    final_norm: int
    vocab_matrix: int  # V·h: the embedding table, and the head's matmul even when tied
    pos_embed: int
    exit_gate: int

    @property
    def total(self) -> int:
        return self.embedding + self.prelude + self.core + self.coda + self.head

    def as_dict(self) -> dict[str, int]:
        return {"embedding": self.embedding, "prelude": self.prelude, "core": self.core,
                "coda": self.coda, "head": self.head, "total": self.total}


def param_counts(m: ModelConfig) -> ParamCounts:
    """Parameter counts by part, grouped as `LoopedLM.param_groups_counts` groups them."""
    blk = block_params(m)
    vocab = m.vocab_size * m.hidden
    pos = m.max_seq_len * m.hidden if m.positions == "learned" else 0
    adapter = (2 * m.hidden * m.hidden + (m.hidden if m.bias else 0)) if m.injection == "concat-linear" else 0
    state_norm = _norm_params(m) if m.state_norm else 0
    final_norm = _norm_params(m) if m.final_norm else 0
    gate = m.hidden + 1 if m.exit_gate else 0
    return ParamCounts(
        embedding=vocab + pos, prelude=m.n_prelude * blk.total,
        core=m.n_core * blk.total + adapter + state_norm,
        coda=m.n_coda * blk.total + final_norm,
        head=(0 if m.tie_embeddings else vocab) + gate,
        block=blk, adapter=adapter, state_norm=state_norm, final_norm=final_norm,
        vocab_matrix=vocab, pos_embed=pos, exit_gate=gate,
    )


@dataclass(frozen=True)
class DepthStats:
    draws: int
    mean_total: float
    mean_free: float
    mean_grad: float
    p50_total: int
    p99_total: int
    p99_grad: int
    max_total: int


def depth_stats(run: RunConfig, draws: int = 10_000) -> DepthStats:
    """Empirical depth statistics of the configured sampler, past any curriculum ramp."""
    sampler = DepthSampler(run.depth, run.seed)
    start = max(run.depth.curriculum.steps, 0)
    samples = [sampler.sample(start + i) for i in range(draws)]
    tot = np.array([s.total for s in samples])
    grad = np.array([s.n_grad for s in samples])
    free = tot - grad
    return DepthStats(
        draws=draws, mean_total=float(tot.mean()), mean_free=float(free.mean()),
        mean_grad=float(grad.mean()), p50_total=int(np.percentile(tot, 50, method="higher")),
        p99_total=int(np.percentile(tot, 99, method="higher")),
        p99_grad=int(np.percentile(grad, 99, method="higher")), max_total=int(tot.max()),
    )


@dataclass(frozen=True)
class Flops:
    outer: float  # 6·N_outer
    core_grad: float  # 6·r̄_grad·N_core
    core_free: float  # 2·r̄_free·N_core
    attention: float
    total: float
    n_outer: int
    n_core: int


def flops_per_token(m: ModelConfig, counts: ParamCounts, seq: int, ds: DepthStats) -> Flops:
    n_outer = counts.prelude + counts.coda + counts.vocab_matrix + counts.exit_gate
    n_core = counts.core
    layers_outer = m.n_prelude + m.n_coda
    attn = 12 * m.hidden * seq * (layers_outer + ds.mean_grad * m.n_core) \
        + 4 * m.hidden * seq * ds.mean_free * m.n_core
    outer, cg, cf = 6 * n_outer, 6 * ds.mean_grad * n_core, 2 * ds.mean_free * n_core
    return Flops(outer, cg, cf, attn, outer + cg + cf + attn, n_outer, n_core)
