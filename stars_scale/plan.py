"""Memory and FLOP planner for looped-model pretraining: which parallel layouts fit, and how long.

Everything is computed from the config, analytically, so a 3.5B plan takes milliseconds and no
GPU. The pieces and their conventions:

Parameters  counted exactly as `LoopedLM` builds them (the tests compare with an instantiated
            model): embedding (+ learned positions), prelude, core (blocks + adapter + state
            norm: the weights every iteration reuses), coda (+ final norm), head (untied
            lm_head, exit gate).
Layout      world = nodes × gpus_per_node = tp · pp · dp. TP (within a node) shards the
            attention/MLP matrices, the embedding and the head; norms and the adapter are
            replicated. PP splits the *core's blocks* over stages (every iteration passes
            through all stages); the prelude and adapter sit on the first stage, the state norm,
            coda and head on the last (with tied embeddings the last stage holds a copy of the
            embedding). Memory is reported for the fullest stage.
Model state per parameter, ZeRO paper accounting. fp32: 4 weights + 4 grads + 8 Adam (m, v).
            bf16 mixed precision: 2 weights + 2 grads + 12 (fp32 master, m, v). ZeRO-1 shards
            the optimizer state over dp, ZeRO-2 also the gradients.
Activations the tensors autograd saves for backward, per microbatch of b sequences × T tokens,
            from a per-block census of what LoopedLM's code saves (norm inputs and outputs, q/k
            before and after RoPE, SDPA's q, k, v, output and log-sum-exp, the MLP's
            intermediates, the log-probabilities of the loss in fp32). Without checkpointing a
            step keeps n_grad iterations of activations; with loop checkpointing only each
            iteration's input state plus one iteration being recomputed in backward; with block
            checkpointing each block's input plus one block. The no-grad iterations keep
            nothing. Verified on CPU in fp32 against the bytes a saved-tensors hook sees (see
            docs/plan.md); in bf16 the same census is used with 2-byte activations, an
            estimate. 1F1B pipelining keeps up to min(pp - stage, microbatches) microbatches in
            flight on a stage.
Transient   not saved but live at the peak: the fp32 gradient of the logits, and the working
            set of one block (its MLP intermediates). An estimate, added before the fit test.
Depth       r, n_free, n_grad from `DepthSampler` itself (after any curriculum), 10,000 draws:
            the mean for FLOPs and the 99th percentile for memory.
FLOPs/token 6·(N_outer + r̄_grad·N_core) + 2·r̄_free·N_core + attention, where N_outer is the
            prelude, the coda and the head matrix, N_core one iteration's weights; attention
            per layer and token 12·h·T for a gradient-carrying pass and 4·h·T for a no-grad one
            (PaLM's convention: full T, a causal kernel does half). Recompute is excluded, as
            in MFU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

from stars_scale.config import ModelConfig, RunConfig
from stars_scale.errors import UserError
from stars_scale.model.layers import mlp_hidden as _mlp_hidden
from stars_scale.stars.depth import DepthSampler

GiB = 1024**3


@dataclass(frozen=True)
class GPUSpec:
    name: str
    mem_bytes: int
    peak_flops: dict[str, float]  # dense, by training dtype (fp32 -> TF32 tensor cores)


GPUS: dict[str, GPUSpec] = {
    "h100": GPUSpec("H100 SXM 80GB", 80 * GiB, {"bf16": 989e12, "fp32": 494e12}),
    "h200": GPUSpec("H200 SXM 141GB", 141 * GiB, {"bf16": 989e12, "fp32": 494e12}),
    "a100": GPUSpec("A100 SXM 80GB", 80 * GiB, {"bf16": 312e12, "fp32": 156e12}),
    "a100-40": GPUSpec("A100 SXM 40GB", 40 * GiB, {"bf16": 312e12, "fp32": 156e12}),
}


# --------------------------------------------------------------------------- parameters


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


# --------------------------------------------------------------------------- depth


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


# --------------------------------------------------------------------------- activations


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
        outer += n * head * b + n * (m.vocab_size / tp) * 4 + n * 8  # fp32 log-probs, targets
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


# --------------------------------------------------------------------------- model state


def stage_param_elems(m: ModelConfig, counts: ParamCounts, st: StageShape, tp: int, pp: int) -> float:
    """Parameters one GPU holds for stage `st` under tp (vocab-parallel embedding and head)."""
    blk = counts.block
    n_blocks = st.prelude + st.core + st.coda
    elems = n_blocks * (blk.sharded / tp + blk.replicated)
    if st.first:
        elems += counts.vocab_matrix / tp + counts.pos_embed + counts.adapter
    if st.last:
        elems += counts.state_norm + counts.final_norm + counts.exit_gate
        if not m.tie_embeddings:
            elems += counts.vocab_matrix / tp
        elif pp > 1:
            elems += counts.vocab_matrix / tp  # the tied head's copy on the last stage
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
    if dtype == "fp32":
        w, g, o = 4.0, 4.0, 8.0
    else:
        w, g, o = 2.0, 2.0, 12.0
    return StateBytes(weights=w * elems, grads=g * elems / (dp if zero >= 2 else 1),
                      optim=o * elems / (dp if zero >= 1 else 1))


# --------------------------------------------------------------------------- FLOPs


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


# --------------------------------------------------------------------------- layouts


@dataclass
class LayoutPlan:
    tp: int
    pp: int
    dp: int
    zero: int
    valid: bool
    reasons: list[str] = field(default_factory=list)  # why invalid / why it does not fit
    stage: int = 0  # the fullest stage
    state: Optional[StateBytes] = None
    # saved activations in flight on that stage (in_flight microbatches), at the mean and the
    # 99th-percentile depth: under the configured checkpointing, without, and with loop
    act_mean: float = 0.0
    act_p99: float = 0.0
    act_mean_no_ckpt: float = 0.0
    act_p99_no_ckpt: float = 0.0
    act_mean_loop_ckpt: float = 0.0
    act_p99_loop_ckpt: float = 0.0
    transient: float = 0.0
    in_flight: int = 1
    total: float = 0.0  # peak bytes per GPU at the 99th-percentile depth
    fits: bool = False
    is_config: bool = False


@dataclass
class Plan:
    config_path: str
    nodes: int
    gpus_per_node: int
    gpu: GPUSpec
    usable_bytes: float
    dtype: str
    checkpointing: str
    batch: int
    seq: int
    microbatches: int
    counts: ParamCounts
    depth: DepthStats
    flops: Flops
    layouts: list[LayoutPlan]
    mfu: float
    token_budget: float

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def tokens_per_s(self) -> float:
        return self.mfu * self.gpu.peak_flops[self.dtype] * self.world / self.flops.total

    def days(self) -> float:
        return self.token_budget / self.tokens_per_s() / 86400

    def config_layout(self) -> LayoutPlan | None:
        return next((lp for lp in self.layouts if lp.is_config), None)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layout_problems(m: ModelConfig, tp: int, pp: int, world: int, gpn: int) -> list[str]:
    out = []
    if world % (tp * pp):
        out.append(f"tp·pp = {tp * pp} does not divide {world} GPUs")
    if tp > gpn:
        out.append(f"tp {tp} spans nodes ({gpn} GPUs per node)")
    kv = m.kv_heads or m.heads
    if m.heads % tp or kv % tp:
        out.append(f"tp {tp} does not divide heads {m.heads} / kv heads {kv}")
    if _mlp_hidden(m) % tp:
        out.append(f"tp {tp} does not divide the MLP width {_mlp_hidden(m)}")
    if m.vocab_size % tp:
        out.append(f"tp {tp} does not divide the vocabulary {m.vocab_size}")
    if pp > m.n_core:
        out.append(f"pp {pp} > {m.n_core} core blocks (a stage would hold no core block)")
    return out


def evaluate_layout(run: RunConfig, counts: ParamCounts, ds: DepthStats, *, tp: int, pp: int,
                    zero: int, world: int, gpn: int, batch: int, seq: int, microbatches: int,
                    usable: float) -> LayoutPlan:
    m, dtype, ckpt = run.model, run.train.dtype, run.train.checkpointing
    problems = _layout_problems(m, tp, pp, world, gpn)
    dp = world // (tp * pp) if world % (tp * pp) == 0 else 0
    lp = LayoutPlan(tp=tp, pp=pp, dp=dp, zero=zero, valid=not problems, reasons=problems)
    if problems:
        return lp
    mean_grad = max(int(round(ds.mean_grad)), 0)
    best = None
    for s, st in enumerate(stage_shapes(m, pp)):
        in_flight = min(pp - s, microbatches)
        state = state_bytes(stage_param_elems(m, counts, st, tp, pp), dtype, zero, dp)

        def act(n_grad: int, mode: str) -> float:
            return in_flight * activation_bytes(m, batch, seq, n_grad, mode, dtype, tp, st).total

        a_mean, a_p99 = act(mean_grad, ckpt), act(ds.p99_grad, ckpt)
        b = 4 if dtype == "fp32" else 2
        transient = (batch * seq * m.vocab_size / tp * 4 if st.last else 0.0) \
            + batch * seq * 2 * _mlp_hidden(m) / tp * b
        total = state.total + a_p99 + transient
        if best is None or total > best.total:
            best = dataclasses.replace(
                lp, stage=s, state=state, act_mean=a_mean, act_p99=a_p99,
                act_mean_no_ckpt=act(mean_grad, "none"), act_p99_no_ckpt=act(ds.p99_grad, "none"),
                act_mean_loop_ckpt=act(mean_grad, "loop"), act_p99_loop_ckpt=act(ds.p99_grad, "loop"),
                transient=transient, in_flight=in_flight, total=total)
    assert best is not None
    best.fits = best.total <= usable
    if not best.fits:
        best.reasons = [_why_not(best, usable, ckpt)]
    return best


def _why_not(lp: LayoutPlan, usable: float, ckpt: str) -> str:
    assert lp.state is not None
    parts = {"weights": lp.state.weights, "gradients": lp.state.grads,
             "optimizer state": lp.state.optim, f"activations ({ckpt} checkpointing, p99 depth)": lp.act_p99,
             "transient": lp.transient}
    big = max(parts, key=parts.get)
    hint = ""
    if big == "optimizer state" and lp.zero < 1 and lp.dp > 1:
        hint = "; ZeRO-1 would shard it over dp"
    elif big == "gradients" and lp.zero < 2 and lp.dp > 1:
        hint = "; ZeRO-2 would shard them over dp"
    elif big.startswith("activations") and ckpt != "loop" and lp.act_p99_loop_ckpt < lp.act_p99:
        hint = "; loop checkpointing would cut them to " + fmt_bytes(lp.act_p99_loop_ckpt)
    elif big.startswith("activations") or big == "weights":
        hint = "; more tp or pp would split them"
    return (f"needs {fmt_bytes(lp.total)} > {fmt_bytes(usable)} usable (stage {lp.stage}); "
            f"largest: {big} {fmt_bytes(parts[big])}{hint}")


def plan(run: RunConfig, nodes: int, gpus_per_node: int, gpu: str = "h100", *, mfu: float = 0.4,
         tokens: float = 1e12, batch: int | None = None, seq: int | None = None,
         usable_fraction: float = 0.9, draws: int = 10_000, config_path: str = "") -> Plan:
    """Plan a run: parameter counts, depth statistics, FLOPs and every (tp, pp, zero) layout."""
    if nodes < 1 or gpus_per_node < 1:
        raise UserError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if gpu not in GPUS:
        raise UserError(f"--gpu {gpu!r}: unknown (one of {', '.join(GPUS)})")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    if not 0 < usable_fraction <= 1:
        raise UserError(f"--usable must be in (0, 1], got {usable_fraction}")
    if tokens <= 0:
        raise UserError(f"--tokens must be > 0, got {tokens}")
    m = run.model
    seq = seq or m.max_seq_len
    if seq > m.max_seq_len or seq < 1:
        raise UserError(f"--seq-len {seq}: must be in [1, model.max_seq_len={m.max_seq_len}]")
    spec = GPUS[gpu]
    world = nodes * gpus_per_node
    if not batch:  # the trainer's semantics: data.batch_size is global, split over dp and microbatches
        tp, pp, mb = run.parallel.tp, run.parallel.pp, run.parallel.microbatches
        if world % (tp * pp):
            raise UserError(f"{nodes} x {gpus_per_node} GPUs do not factor into the config's tp={tp} x pp={pp}")
        dp = world // (tp * pp)
        if run.data.batch_size % (dp * mb):
            raise UserError(f"data.batch_size={run.data.batch_size} is not divisible by dp={dp} x "
                            f"parallel.microbatches={mb} of the config's layout on {world} GPUs")
        batch = run.data.batch_size // (dp * mb)
    if batch < 1:
        raise UserError(f"--micro-batch must be >= 1, got {batch}")
    usable = spec.mem_bytes * usable_fraction
    counts = param_counts(m)
    ds = depth_stats(run, draws)
    micro = run.parallel.microbatches * run.train.grad_accum
    cfg_layout = (run.parallel.tp, run.parallel.pp, run.parallel.zero)
    layouts = []
    for tp in [d for d in _divisors(gpus_per_node)]:
        for pp in _divisors(world // tp) if world % tp == 0 else []:
            if pp > m.n_core:
                continue
            for zero in (0, 1, 2):
                layouts.append(evaluate_layout(run, counts, ds, tp=tp, pp=pp, zero=zero, world=world,
                                               gpn=gpus_per_node, batch=batch, seq=seq,
                                               microbatches=micro, usable=usable))
    if cfg_layout not in {(lp.tp, lp.pp, lp.zero) for lp in layouts}:
        layouts.append(evaluate_layout(run, counts, ds, tp=cfg_layout[0], pp=cfg_layout[1],
                                       zero=cfg_layout[2], world=world, gpn=gpus_per_node,
                                       batch=batch, seq=seq, microbatches=micro, usable=usable))
    for lp in layouts:
        lp.is_config = (lp.tp, lp.pp, lp.zero) == cfg_layout
    return Plan(config_path=config_path, nodes=nodes, gpus_per_node=gpus_per_node, gpu=spec,
                usable_bytes=usable, dtype=run.train.dtype, checkpointing=run.train.checkpointing,
                batch=batch, seq=seq, microbatches=micro, counts=counts, depth=ds,
                flops=flops_per_token(m, counts, seq, ds), layouts=layouts, mfu=mfu, token_budget=tokens)


# --------------------------------------------------------------------------- report


def fmt_bytes(x: float) -> str:
    return f"{x / GiB:.1f} GiB" if x >= 0.1 * GiB else f"{x / 1024**2:.1f} MiB"


def fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def format_plan(p: Plan, show: Literal["all", "fit", "config"] = "all") -> str:
    c, d, f = p.counts, p.depth, p.flops
    lines = [
        f"plan: {p.config_path or 'config'} on {p.nodes} node(s) × {p.gpus_per_node} {p.gpu.name} "
        f"= {p.world} GPU{'s' if p.world != 1 else ''} ({fmt_bytes(p.usable_bytes)} usable each), {p.dtype}, "
        f"{p.checkpointing} checkpointing",
        "",
        f"parameters: {fmt_count(c.total)} total = embedding {fmt_count(c.embedding)} + prelude "
        f"{fmt_count(c.prelude)} + core {fmt_count(c.core)} + coda {fmt_count(c.coda)} + head "
        f"{fmt_count(c.head)}   (per block {fmt_count(c.block.total)})",
        f"depth ({d.draws} draws of the configured sampler): mean r {d.mean_total:.2f} "
        f"(no-grad {d.mean_free:.2f}, grad {d.mean_grad:.2f}); median {d.p50_total}; p99 r "
        f"{d.p99_total} (grad {d.p99_grad}); max seen {d.max_total}",
        f"FLOPs/token at the mean depth: {fmt_count(f.total)} = 6·N_outer {fmt_count(f.outer)} + "
        f"6·r̄_grad·N_core {fmt_count(f.core_grad)} + 2·r̄_free·N_core {fmt_count(f.core_free)} + "
        f"attention {fmt_count(f.attention)}   (N_outer {fmt_count(f.n_outer)}, N_core "
        f"{fmt_count(f.n_core)}; a dense model of the same FLOPs: {fmt_count(f.total / 6)} params)",
        f"microbatch: {p.batch} × {p.seq} tokens; {p.microbatches} microbatch(es) per step per "
        f"data-parallel rank",
        "",
        f"layouts: per GPU on the fullest stage; activations for the microbatches in flight there "
        f"(mb), without and with loop checkpointing at the mean and p99 depth; total = state + "
        f"{p.checkpointing}-checkpointing activations at p99 + transient:",
        f"  {'tp':>3} {'pp':>3} {'dp':>4} {'zero':>4} | {'weights':>9} {'grads':>9} {'optim':>9} | "
        f"{'mb':>2} {'none@mean':>9} {'none@p99':>9} {'loop@mean':>9} {'loop@p99':>9} "
        f"{'transient':>9} | {'total':>9}  fits",
    ]
    shown = 0
    invalid_seen: set[tuple[int, int]] = set()
    for lp in sorted(p.layouts, key=lambda x: (not x.valid, x.tp, x.pp, x.zero)):
        if show == "fit" and not (lp.fits or lp.is_config):
            continue
        if show == "config" and not lp.is_config:
            continue
        mark = " <- config" if lp.is_config else ""
        if not lp.valid:  # the reason does not depend on the ZeRO stage: one line per (tp, pp)
            if (lp.tp, lp.pp) in invalid_seen and not lp.is_config:
                continue
            invalid_seen.add((lp.tp, lp.pp))
            zero = lp.zero if lp.is_config else "*"
            lines.append(f"  {lp.tp:>3} {lp.pp:>3} {'-':>4} {zero:>4} | invalid: "
                         f"{'; '.join(lp.reasons)}{mark}")
            shown += 1
            continue
        s = lp.state
        assert s is not None
        lines.append(
            f"  {lp.tp:>3} {lp.pp:>3} {lp.dp:>4} {lp.zero:>4} | {fmt_bytes(s.weights):>9} "
            f"{fmt_bytes(s.grads):>9} {fmt_bytes(s.optim):>9} | {lp.in_flight:>2} "
            f"{fmt_bytes(lp.act_mean_no_ckpt):>9} {fmt_bytes(lp.act_p99_no_ckpt):>9} "
            f"{fmt_bytes(lp.act_mean_loop_ckpt):>9} {fmt_bytes(lp.act_p99_loop_ckpt):>9} "
            f"{fmt_bytes(lp.transient):>9} | {fmt_bytes(lp.total):>9}  {'yes' if lp.fits else 'no'}{mark}")
        shown += 1
    if not shown:
        lines.append("  (none)")
    fitting = [lp for lp in p.layouts if lp.fits]
    lines.append("")
    cl = p.config_layout()
    if cl is not None:
        if cl.fits:
            lines.append(f"config layout tp={cl.tp} pp={cl.pp} zero={cl.zero} (dp={cl.dp}): fits, "
                         f"{fmt_bytes(cl.total)} of {fmt_bytes(p.usable_bytes)}")
        else:
            lines.append(f"config layout tp={cl.tp} pp={cl.pp} zero={cl.zero}: does not fit: "
                         f"{'; '.join(cl.reasons)}")
    if fitting:
        best = min(fitting, key=lambda x: (x.tp * x.pp, x.zero, x.total))
        lines.append(f"smallest model-parallel layout that fits: tp={best.tp} pp={best.pp} "
                     f"zero={best.zero} (dp={best.dp}), {fmt_bytes(best.total)} per GPU")
    else:
        lines.append("no layout fits: reduce the microbatch, enable loop checkpointing, or add GPUs")
    tps = p.tokens_per_s()
    tokens_per_step = p.batch * p.seq * p.microbatches * (cl.dp if cl is not None and cl.valid else 1)
    lines.append(f"throughput at {p.mfu:.0%} MFU ({p.gpu.peak_flops[p.dtype] / 1e12:.0f} TFLOP/s "
                 f"{p.dtype} peak per GPU): {fmt_count(tps)} tokens/s; {p.token_budget:.3g} tokens "
                 f"in {p.days():.1f} days; {tokens_per_step:,} tokens per step "
                 f"({tokens_per_step / tps:.2f} s per step)")
    return "\n".join(lines)


def plan_to_dict(p: Plan) -> dict:
    """A JSON-ready summary (bytes as numbers)."""
    def lp_dict(lp: LayoutPlan) -> dict:
        d = {k: v for k, v in dataclasses.asdict(lp).items() if k != "state"}
        if lp.state is not None:
            d.update(weights=lp.state.weights, grads=lp.state.grads, optim=lp.state.optim)
        return d

    return {
        "nodes": p.nodes, "gpus_per_node": p.gpus_per_node, "gpu": p.gpu.name,
        "usable_bytes": p.usable_bytes, "dtype": p.dtype, "checkpointing": p.checkpointing,
        "batch": p.batch, "seq": p.seq, "microbatches": p.microbatches,
        "params": p.counts.as_dict(), "depth": dataclasses.asdict(p.depth),
        "flops_per_token": dataclasses.asdict(p.flops), "tokens_per_s": p.tokens_per_s(),
        "days": p.days(), "token_budget": p.token_budget, "mfu": p.mfu,
        "layouts": [lp_dict(lp) for lp in p.layouts],
    }
