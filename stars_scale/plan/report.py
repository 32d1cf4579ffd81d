"""The planner's report: the table `stars-plan` prints and its JSON form."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

from stars_scale.plan.memory import fmt_bytes

if TYPE_CHECKING:
    from stars_scale.plan.search import LayoutPlan, Plan


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
        f"{'mb':>4} {'none@mean':>9} {'none@p99':>9} {'loop@mean':>9} {'loop@p99':>9} "
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
            f"{fmt_bytes(s.grads):>9} {fmt_bytes(s.optim):>9} | {lp.in_flight:>4.3g} "
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
