"""Memory per GPU for the planner: saved activations of one microbatch (a census of what
LoopedLM's code saves, by checkpointing mode and pipeline stage), and parameters, gradients and
optimizer state of a stage under tp and ZeRO."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stars_scale.config import ModelConfig
from stars_scale.model.layers import mlp_hidden as _mlp_hidden
from stars_scale.parallel.layout import padded_vocab
from stars_scale.plan.counting import ParamCounts

GiB = 1024**3


def fmt_bytes(x: float) -> str:
    return f"{x / GiB:.1f} GiB" if x >= 0.1 * GiB else f"{x / 1024**2:.1f} MiB"


def _norm_saved(m: ModelConfig) -> tuple[int, int]:
    """(hidden-sized, per-token scalars) a norm saves, beyond the output its consumer keeps."""
    return (2, 1) if m.norm == "rmsnorm" else (1, 2)


@dataclass(frozen=True)
class BlockActs:
    """Saved elements per token for one block call: replicated and TP-sharded parts, and a
    per-sequence-position part (RoPE's cos/sin copies), independent of the batch."""
    replicated: float
    sharded: float
    per_position: float


def block_activation_elems(m: ModelConfig) -> BlockActs:
    h, H = m.hidden, m.heads
    hd = h // H
    kvd = (m.kv_heads or H) * hd
    inter = _mlp_hidden(m)
    nh, ns = _norm_saved(m)
    # norms on the residual stream and their outputs' consumers (replicated under TP)
    if m.norm_placement == "pre":
        # n1: x, stats, y1 (read by q/k/v); n2: x2, stats, y2 (read by the MLP)
        rep = 2 * (nh + 1) * h + 2 * ns
    elif m.norm_placement == "post":
        # x read by q/k/v; n1 saves r1 (+stats), output read by the MLP; n2 saves r2
        rep = h + nh * h + h + nh * h + 2 * ns
    else:  # sandwich, peri: four norms, two of them feeding a sublayer
        rep = 2 * (nh + 1) * h + 2 * nh * h + 4 * ns
    # attention (sharded by heads): SDPA keeps q, k, v (repeated to all heads for GQA), its
    # output and log-sum-exp; o_proj's input is a view of that output (flash kernels write
    # [B, T, H, D]). RoPE multiplies by constants, so it keeps only its cos/sin copies (below)
    sh = 0.0
    if m.qk_norm:
        sh += 2 * h + 2 * kvd + 2 * H  # q/k before their norms, normalised, stats
    sh += 4 * h + H
    # MLP: swiglu keeps gate, silu(gate), up, and the product; gelu the pre- and post-activation
    sh += 4 * inter if m.mlp == "swiglu" else 2 * inter
    per_pos = 4 * hd if m.positions == "rope" else 0  # cos/sin tiled copies for q and k
    return BlockActs(rep, sh, per_pos)


@dataclass(frozen=True)
class StageShape:
    """What one pipeline stage runs: its blocks and the extras around the loop."""
    prelude: int
    core: int  # core blocks per iteration on this stage
    coda: int
    first: bool
    last: bool


def stage_shapes(m: ModelConfig, pp: int) -> list[StageShape]:
    base, extra = divmod(m.n_core, pp)
    out = []
    for s in range(pp):
        out.append(StageShape(prelude=m.n_prelude if s == 0 else 0,
                              core=base + (1 if s < extra else 0),
                              coda=m.n_coda if s == pp - 1 else 0, first=s == 0, last=s == pp - 1))
    return out


@dataclass
class ActivationBytes:
    outer: float  # prelude, coda, head and loss (kept for the whole step)
    per_iteration: float  # one gradient-carrying iteration's saved tensors
    held: float  # what checkpointing keeps between forward and backward
    recompute: float  # the largest piece re-run in backward under checkpointing
    total: float  # at the peak: outer + n_grad·per_iteration, or outer + held + recompute


def activation_bytes(m: ModelConfig, batch: int, seq: int, n_grad: int,
                     checkpointing: Literal["none", "loop", "block"] = "none",
                     dtype: Literal["fp32", "bf16"] = "fp32", tp: int = 1,
                     stage: StageShape | None = None) -> ActivationBytes:
    """Bytes autograd keeps for one microbatch of `batch` × `seq` tokens at `n_grad` iterations."""
    st = stage or StageShape(m.n_prelude, m.n_core, m.n_coda, True, True)
    b = 4 if dtype == "fp32" else 2
    n = batch * seq
    h = m.hidden
    blk = block_activation_elems(m)
    nh, ns = _norm_saved(m)

    def blocks(k: int) -> float:
        return k * (n * (blk.replicated + blk.sharded / tp) + seq * blk.per_position) * b

    inject = {"concat-linear": 2 * h, "add": 0, "none": 0}[m.injection] if st.first else 0
    snorm = (nh * h + ns) if (m.state_norm and st.last) else 0
    per_iter = blocks(st.core) + n * (inject + snorm) * b
    outer = blocks(st.prelude + st.coda)
    if st.first:
        outer += n * 8  # token ids kept by the embedding
    if st.last:
        head = 0.0
        if m.pre_coda_norm:
            head += nh * h + ns
        if m.final_norm:
            head += nh * h + ns
        head += h  # lm_head input
        outer += n * head * b + n * (padded_vocab(m.vocab_size, tp) / tp) * 4 + n * 8  # fp32 log-probs, targets
    if checkpointing == "none":
        return ActivationBytes(outer, per_iter, 0.0, 0.0, outer + n_grad * per_iter)
    if checkpointing == "loop":
        # each iteration's input state, and e (an argument of every checkpointed iteration)
        held = n * h * b * (n_grad + (1 if st.first else 0))
        recompute = per_iter if n_grad > 0 else 0.0
        return ActivationBytes(outer, per_iter, held, recompute, outer + held + recompute)
    # block: every block's input kept; inject/state-norm are outside the checkpointed blocks
    calls = st.prelude + st.coda + n_grad * st.core
    held = n * h * b * calls
    loose = n_grad * n * (inject + snorm) * b
    outer_loose = outer - blocks(st.prelude + st.coda)
    recompute = blocks(1) if calls else 0.0
    return ActivationBytes(outer_loose + loose, per_iter, held, recompute,
                           outer_loose + loose + held + recompute)


def vocab_rows_per_rank(m: ModelConfig, tp: int) -> int:
    """Rows of the embedding (and head) on one tensor-parallel rank: the vocabulary padded to tp."""
    return padded_vocab(m.vocab_size, tp) // tp


def stage_param_elems(m: ModelConfig, counts: ParamCounts, st: StageShape, tp: int) -> float:
    """Parameters one GPU holds for stage `st` under tp (vocab-parallel embedding and head,
    padded as parallel/tensor.py pads them; the adapter row-parallel). A tied head keeps no copy on the last stage: the
    first stage's weight is sent to it every step (a transient, see `evaluate_layout`)."""
    blk = counts.block
    n_blocks = st.prelude + st.core + st.coda
    elems = n_blocks * (blk.sharded / tp + blk.replicated)
    vocab = vocab_rows_per_rank(m, tp) * m.hidden
    if st.first:
        adapter_bias = m.hidden if (counts.adapter and m.bias) else 0  # after the row-parallel all-reduce
        elems += vocab + counts.pos_embed + (counts.adapter - adapter_bias) / tp + adapter_bias
    if st.last:
        elems += counts.state_norm + counts.final_norm + counts.exit_gate
        if not m.tie_embeddings:
            elems += vocab
    return elems


@dataclass
class StateBytes:
    weights: float
    grads: float
    optim: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optim


def state_bytes(elems: float, dtype: str, zero: int, dp: int) -> StateBytes:
    """Weights, gradients, optimizer state. AdamW keeps m and v (8 B); mixed precision and ZeRO
    (DeepSpeed keeps an fp32 master partition even in fp32 training) add the fp32 master (4 B)."""
    if dtype == "fp32":
        w, g, o = 4.0, 4.0, (12.0 if zero >= 1 else 8.0)
    else:
        w, g, o = 2.0, 2.0, 12.0
    return StateBytes(weights=w * elems, grads=g * elems / (dp if zero >= 2 else 1),
                      optim=o * elems / (dp if zero >= 1 else 1))
