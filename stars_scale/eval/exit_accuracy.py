"""Convergence-aware evaluation: accuracy against the loops each exit rule spends.

For arithmetic (exact-match answers), every (rule, tol) generates the answers of the test
prompts greedily through `stars_scale.generate` and reports exact-match accuracy and the loops
per generated token (mean, p99, max). The fixed-depth sweep of `depth_scaling` supplies the
baseline: depth r costs r loops per token (teacher-forced exact match equals greedy decoding,
see data/arithmetic.py). `summarise` answers the question the rules are for: the best fixed
accuracy, the smallest fixed depth reaching it, and which rules match it with fewer loops. The
sweep's oracle (each problem at its first right depth) is the floor every per-problem rule is
measured against; with `groups` (e.g. the chains task's difficulty) each rule's accuracy and
loops are also reported per group: does the rule spend more loops where more are needed?
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stars_scale.errors import UserError
from stars_scale.eval.depth_scaling import accuracy_and_loops
from stars_scale.generate import GenerateOptions, generate, make_rule
from stars_scale.utils import atomic_write


def parse_tols(text: str, rules: list[str]) -> list[tuple[str, float]]:
    """'1e-3' (every rule) or 'delta=1e-2,kl=1e-4,contraction=1e-3' (repeat a rule for a sweep)."""
    out: list[tuple[str, float]] = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, _, val = item.rpartition("=")
        try:
            tol = float(val)
        except ValueError:
            raise UserError(f"--tol: {item!r} is not a number or RULE=NUMBER") from None
        if name and name not in rules:
            raise UserError(f"--tol: {item!r} names rule {name!r}, which is not in --exit {','.join(rules)}")
        for rule in [name] if name else rules:
            try:
                make_rule(rule, tol=tol)  # the rule's own bounds on its tolerance
            except ValueError as e:
                raise UserError(f"--tol: {item!r}: {e}") from None
            out.append((rule, tol))
    if not out:
        raise UserError("--tol: expected a tolerance")
    missing = [r for r in rules if r not in {n for n, _ in out}]
    if missing:
        raise UserError(f"--tol: no tolerance for rule(s) {', '.join(missing)}")
    return out


@torch.no_grad()
def exit_rule_eval(model, batch: dict[str, torch.Tensor], prompt_len: int, settings: list[tuple[str, float]], *,
                   max_depth: int, eos_id: int, cache: str = "full", cache_slots: int = 4, rho_iters: int = 0,
                   warm_start: bool = False, batch_size: int = 256,
                   groups: torch.Tensor | None = None) -> list[dict]:
    ids, labels = batch["input_ids"], batch["labels"]
    target = ids[:, prompt_len:]
    n_new = target.shape[1]
    rows = []
    for rule, tol in settings:
        opts = GenerateOptions(max_new_tokens=n_new, exit=rule, tol=tol, max_depth=max_depth, cache=cache,
                               cache_slots=cache_slots, rho_iters=rho_iters, warm_start=warm_start, eos_id=eos_id)
        right, loops, probes = [], [], 0
        for start in range(0, ids.shape[0], batch_size):
            res = generate(model, ids[start:start + batch_size, :prompt_len], opts)
            right.append((res.tokens[:, prompt_len:].cpu() == target[start:start + batch_size].cpu()).all(1))
            loops.append(res.loops.cpu())
            probes += res.probe_evals
        right_t, loops_t = torch.cat(right), torch.cat(loops)
        arr = loops_t[loops_t > 0].double().numpy()
        row = {"rule": rule, "tol": tol, "accuracy": float(right_t.double().mean()), "mean_loops": float(arr.mean()),
               "p99_loops": float(np.percentile(arr, 99)), "max_loops": int(arr.max()),
               "tokens": int(arr.size), "probe_evals": probes}
        if groups is not None:
            row["by_group"] = accuracy_and_loops(right_t, loops_t.sum(1), (loops_t > 0).sum(1), groups)["by_group"]
        rows.append(row)
    return rows


def summarise(fixed: dict, rules: list[dict]) -> dict:
    """Best fixed-depth accuracy, the smallest depth reaching it, each rule's loops relative to it."""
    acc = fixed["accuracy"]
    best = max(acc)
    r_best = min(d for d, a in zip(fixed["depths"], acc) if a >= best)
    out = {"best_fixed_accuracy": best, "best_fixed_depth": r_best, "rules": []}
    for row in rules:
        out["rules"].append({**row, "matches_best": row["accuracy"] >= best,
                             "loop_fraction": row["mean_loops"] / r_best})
    return out


def format_table(fixed: dict, rules: list[dict]) -> str:
    lines = ["| decoding | accuracy | mean loops | p99 loops |", "|---|---|---|---|"]
    for d, a in zip(fixed["depths"], fixed["accuracy"]):
        lines.append(f"| fixed r={d} | {100 * a:.1f}% | {d} | {d} |")
    for r in rules:
        lines.append(f"| {r['rule']} tol={r['tol']:g} | {100 * r['accuracy']:.1f}% | {r['mean_loops']:.2f} | "
                     f"{r['p99_loops']:.0f} |")
    oracle = fixed.get("oracle_exit")
    if oracle:
        lines.append(f"| oracle: each problem at its first right depth | {100 * oracle['accuracy']:.1f}% | "
                     f"{oracle['mean_loops']:.2f} | |")
    groups = list(oracle.get("by_group", {})) if oracle else []
    if groups and all("by_group" in r for r in rules):
        lines += ["", "Per group (difficulty): exact match % / mean loops per token", "",
                  "| decoding | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        named = [(f"{r['rule']} tol={r['tol']:g}", r["by_group"]) for r in rules] + [("oracle", oracle["by_group"])]
        for name, by in named:
            lines.append(f"| {name} | " + " | ".join(
                f"{100 * by[g]['accuracy']:.1f} / {by[g]['mean_loops']:.2f}" for g in groups) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_loops(fixed: dict, rules: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(fixed["depths"], [100 * a for a in fixed["accuracy"]], "k-o", label="fixed depth r", ms=4)
    markers = {"delta": "s", "kl": "^", "confidence": "D", "contraction": "*", "fixed": "o"}
    by_rule: dict[str, list[dict]] = {}
    for r in rules:
        by_rule.setdefault(r["rule"], []).append(r)
    for name, rows in by_rule.items():
        rows = sorted(rows, key=lambda r: r["mean_loops"])
        ax.plot([r["mean_loops"] for r in rows], [100 * r["accuracy"] for r in rows], marker=markers.get(name, "x"),
                ms=9 if name == "contraction" else 6, ls="--", label=f"exit: {name}")
        for r in rows:
            ax.annotate(f"{r['tol']:g}", (r["mean_loops"], 100 * r["accuracy"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")
    oracle = fixed.get("oracle_exit")
    if oracle:
        ax.plot([oracle["mean_loops"]], [100 * oracle["accuracy"]], "kD", mfc="none", ms=8,
                label="oracle: each problem at its first right depth")
    ax.set_xlabel("loops per generated token (fixed r, or the rule's mean)")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(-2, 102)
    save_log2_plot(fig, ax, path, title)


def save_log2_plot(fig, ax, path: Path, title: str = "") -> None:
    """Shared finish of the test-time plots: log2 x axis, grid, legend, title, atomic PNG write."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)

