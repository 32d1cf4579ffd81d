"""The layout search: every (tp, pp, zero) on the allocation, checked by the trainer's own layout
rules (`parallel.layout`), with the memory of its fullest stage against the GPU."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from stars_scale.config import RunConfig
from stars_scale.errors import UserError
from stars_scale.model.layers import mlp_hidden as _mlp_hidden
from stars_scale.parallel.layout import layout_problems
from stars_scale.parallel.schedule import peak_held
from stars_scale.plan.counting import DepthStats, Flops, ParamCounts, depth_stats, flops_per_token, param_counts
from stars_scale.plan.memory import GiB, StateBytes, activation_bytes, fmt_bytes, stage_param_elems, stage_shapes, state_bytes, vocab_rows_per_rank


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


@dataclass
class StageMemory:
    """One stage's bytes per GPU at the 99th-percentile depth (configured checkpointing)."""
    state: StateBytes
    activations: float  # saved for backward, for the microbatches a stage holds in flight
    transient: float
    total: float


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
    # saved activations in flight on that stage (in_flight microbatches' worth), at the mean and the
    # 99th-percentile depth: under the configured checkpointing, without, and with loop
    act_mean: float = 0.0
    act_p99: float = 0.0
    act_mean_no_ckpt: float = 0.0
    act_p99_no_ckpt: float = 0.0
    act_mean_loop_ckpt: float = 0.0
    act_p99_loop_ckpt: float = 0.0
    transient: float = 0.0
    in_flight: float = 1.0
    total: float = 0.0  # peak bytes per GPU at the 99th-percentile depth
    fits: bool = False
    is_config: bool = False
    stages: list[StageMemory] = field(default_factory=list)  # every stage (the fullest is `stage`)


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


def evaluate_layout(run: RunConfig, counts: ParamCounts, ds: DepthStats, *, tp: int, pp: int,
                    zero: int, world: int, batch: int, seq: int, microbatches: int,
                    usable: float) -> LayoutPlan:
    m, dtype, ckpt = run.model, run.train.dtype, run.train.checkpointing
    problems = layout_problems(run, world, tp=tp, pp=pp, batch=False)
    dp = world // (tp * pp) if world % (tp * pp) == 0 else 0
    lp = LayoutPlan(tp=tp, pp=pp, dp=dp, zero=zero, valid=not problems, reasons=problems)
    if problems:
        return lp
    mean_grad = max(int(round(ds.mean_grad)), 0)
    n_free = max(int(round(ds.mean_free)), 0)
    best = None
    per_stage = []
    for s, st in enumerate(stage_shapes(m, pp)):
        state = state_bytes(stage_param_elems(m, counts, st, tp), dtype, zero, dp)

        def act(n_grad: int, mode: str) -> float:
            return in_flight(run, pp, microbatches, n_free, n_grad)[s] \
                * activation_bytes(m, batch, seq, n_grad, mode, dtype, tp, st).total

        a_mean, a_p99 = act(mean_grad, ckpt), act(ds.p99_grad, ckpt)
        b = 4 if dtype == "fp32" else 2
        transient = (batch * seq * vocab_rows_per_rank(m, tp) * 4 if st.last else 0.0) \
            + batch * seq * 2 * _mlp_hidden(m) / tp * b
        if st.last and m.tie_embeddings and pp > 1:  # the tied weight received for the step, fp32
            transient += vocab_rows_per_rank(m, tp) * m.hidden * 4
        total = state.total + a_p99 + transient
        per_stage.append(StageMemory(state, a_p99, transient, total))
        if best is None or total > best.total:
            best = dataclasses.replace(
                lp, stage=s, state=state, act_mean=a_mean, act_p99=a_p99,
                act_mean_no_ckpt=act(mean_grad, "none"), act_p99_no_ckpt=act(ds.p99_grad, "none"),
                act_mean_loop_ckpt=act(mean_grad, "loop"), act_p99_loop_ckpt=act(ds.p99_grad, "loop"),
                transient=transient, in_flight=in_flight(run, pp, microbatches, n_free, mean_grad)[s],
                total=total)
    assert best is not None
    best.stages = per_stage
    best.fits = best.total <= usable
    if not best.fits:
        best.reasons = [_why_not(best, usable, ckpt)]
    return best


def in_flight(run: RunConfig, pp: int, microbatches: int, n_free: int, n_grad: int) -> list[float]:
    """Microbatches' worth of activations each stage holds at once under the configured schedule:
    the schedule's most held gradient-carrying passes over the passes per microbatch (1f1b:
    about min(pp, M), gpipe: M; the estimator's passes are not counted)."""
    if pp == 1 or n_grad == 0:
        return [1.0] * pp
    grads = (False,) * n_free + (True,) * n_grad
    held = peak_held(pp, microbatches, grads, (True,) * len(grads), run.parallel.schedule)
    return [h / n_grad for h in held]


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
                                               batch=batch, seq=seq,
                                               microbatches=micro, usable=usable))
    if cfg_layout not in {(lp.tp, lp.pp, lp.zero) for lp in layouts}:
        layouts.append(evaluate_layout(run, counts, ds, tp=cfg_layout[0], pp=cfg_layout[1],
                                       zero=cfg_layout[2], world=world,
                                       batch=batch, seq=seq, microbatches=micro, usable=usable))
    for lp in layouts:
        lp.is_config = (lp.tp, lp.pp, lp.zero) == cfg_layout
    return Plan(config_path=config_path, nodes=nodes, gpus_per_node=gpus_per_node, gpu=spec,
                usable_bytes=usable, dtype=run.train.dtype, checkpointing=run.train.checkpointing,
                batch=batch, seq=seq, microbatches=micro, counts=counts, depth=ds,
                flops=flops_per_token(m, counts, seq, ds), layouts=layouts, mfu=mfu, token_budget=tokens)
