"""Compare the test-time depth scaling of several runs: one plot and one table.

Each run is a `depth_scaling.json` (written by training with `eval.depths`, or by `stars-eval
depth`), a directory holding one, or a run directory whose latest `eval_step_*` holds one. Runs
given the same label are one group (e.g. seeds of one config): the plot draws the group's mean
with its min-max band, the table gives the mean and, for groups of several runs, the range.
Depths need not match across runs: a group's value at a depth is over the runs that have it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from stars_scale.errors import UserError
from stars_scale.utils import atomic_write, atomic_write_json, atomic_write_text

METRICS = ("accuracy", "loss", "delta_h", "rho")


def find_results(path: Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    if (path / "depth_scaling.json").is_file():
        return path / "depth_scaling.json"
    evals = sorted(path.glob("eval_step_*/depth_scaling.json"), key=lambda p: _step_of(p.parent.name))
    if evals:
        return evals[-1]
    if path.is_dir():
        raise UserError(f"{path}: no depth_scaling.json in it or in an eval_step_* directory "
                        f"(run `stars-eval depth --checkpoint {path}` first)")
    raise UserError(f"{path}: no such file or directory")


def _step_of(name: str) -> int:
    tail = name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def load_results(path: Path) -> dict:
    """One run's depth sweep, checked: depths, and per depth the loss, ‖Δh‖ and ρ̂ (accuracy may be null)."""
    f = find_results(path)
    try:
        r = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{f}: not a readable JSON file ({e})") from None
    if not isinstance(r, dict) or not isinstance(r.get("depths"), list) or not r["depths"]:
        raise UserError(f"{f}: expected a depth sweep with a non-empty 'depths' list")
    n = len(r["depths"])
    for key in METRICS:
        v = r.get(key)
        if key == "accuracy" and v is None:
            continue
        if not isinstance(v, list) or len(v) != n or not all(isinstance(x, (int, float)) for x in v):
            raise UserError(f"{f}: '{key}' must be a list of {n} numbers, one per depth")
    if not all(isinstance(d, int) and d >= 1 for d in r["depths"]):
        raise UserError(f"{f}: 'depths' must be positive integers")
    return {"source": str(f), **{k: r.get(k) for k in ("depths",) + METRICS}}


def group_runs(paths: list[str], labels: list[str] | None = None) -> list[tuple[str, list[dict]]]:
    """[(label, [results, ...]), ...] in first-seen label order; the default label is the run's name."""
    if labels is not None and len(labels) != len(paths):
        raise UserError(f"--labels: {len(labels)} labels for {len(paths)} runs; give one per run")
    groups: dict[str, list[dict]] = {}
    for i, p in enumerate(paths):
        r = load_results(Path(p))
        label = labels[i] if labels else _default_label(Path(r["source"]))
        groups.setdefault(label, []).append(r)
    return list(groups.items())


def _default_label(f: Path) -> str:
    d = f.parent
    return d.parent.name if d.name.startswith("eval_") else d.name


def summarize_group(runs: list[dict]) -> dict:
    """Per depth (union over the runs), each metric's mean, min and max over the runs that have it."""
    depths = sorted({d for r in runs for d in r["depths"]})
    out = {"n": len(runs), "sources": [r.get("source") for r in runs], "depths": depths}
    for key in METRICS:
        if any(r.get(key) is None for r in runs):
            out[key] = None
            continue
        stats = {"mean": [], "min": [], "max": []}
        for d in depths:
            vals = [r[key][r["depths"].index(d)] for r in runs if d in r["depths"]]
            stats["mean"].append(sum(vals) / len(vals))
            stats["min"].append(min(vals))
            stats["max"].append(max(vals))
        out[key] = stats
    return out


def plot_groups(groups: list[tuple[str, dict]], path: Path, title: str = "") -> None:
    """Accuracy (or loss), ‖Δh‖ and ρ̂ against depth: each group's mean, its min-max band when n > 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_acc = all(g["accuracy"] is not None for _, g in groups)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("accuracy" if has_acc else "loss", 100.0 if has_acc else 1.0), ("delta_h", 1.0), ("rho", 1.0)]
    for label, g in groups:
        color = None
        for ax, (key, scale) in zip(axes, panels):
            s = g[key]
            lo = [max(scale * x, 1e-12) if key == "delta_h" else scale * x for x in s["min"]]
            hi = [max(scale * x, 1e-12) if key == "delta_h" else scale * x for x in s["max"]]
            mean = [max(scale * x, 1e-12) if key == "delta_h" else scale * x for x in s["mean"]]
            n = f" (n={g['n']})" if g["n"] > 1 else ""
            line, = ax.plot(g["depths"], mean, marker="o", ms=3, color=color, label=f"{label}{n}" if label else None)
            color = line.get_color()
            if g["n"] > 1:
                ax.fill_between(g["depths"], lo, hi, color=color, alpha=0.2, lw=0)
    axes[0].set_ylabel("exact match (%)" if has_acc else "loss")
    if has_acc:
        axes[0].set_ylim(-2, 102)
    axes[1].set_ylabel("‖h_r − h_{r−1}‖ / ‖h_{r−1}‖")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("ρ̂ of the core map")
    axes[2].axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("loop depth r at test time")
        ax.grid(alpha=0.3)
    if any(label for label, _ in groups):
        axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def _cell(s: dict, i: int, scale: float, fmt: str, n: int) -> str:
    mean = s["mean"][i]
    if isinstance(mean, float) and math.isnan(mean):
        return "nan"
    text = format(scale * mean, fmt)
    if n > 1:
        text += f" ({format(scale * s['min'][i], fmt)}–{format(scale * s['max'][i], fmt)})"
    return text


def markdown_table(groups: list[tuple[str, dict]]) -> str:
    """One row per (run, metric), one column per depth; groups show `mean (min–max)`."""
    depths = sorted({d for _, g in groups for d in g["depths"]})
    lines = ["| run | metric | " + " | ".join(f"r={d}" for d in depths) + " |",
             "|---|---|" + "---|" * len(depths)]
    rows = [("accuracy", "exact match %", 100.0, ".1f"), ("loss", "loss", 1.0, ".3f"),
            ("delta_h", "‖Δh‖/‖h‖", 1.0, ".0e"), ("rho", "ρ̂", 1.0, ".2f")]
    for label, g in groups:
        first = True
        for key, name, scale, fmt in rows:
            if g[key] is None:
                continue
            cells = [_cell(g[key], g["depths"].index(d), scale, fmt, g["n"]) if d in g["depths"] else ""
                     for d in depths]
            head = f"{label} (n={g['n']})" if first else ""
            lines.append(f"| {head} | {name} | " + " | ".join(cells) + " |")
            first = False
    return "\n".join(lines) + "\n"


def write_compare(groups: list[tuple[str, list[dict]]], out_dir: Path, title: str = "") -> dict[str, Path]:
    """compare.png, compare.json (per group: sources and per-depth mean/min/max) and compare.md in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = [(label, summarize_group(runs)) for label, runs in groups]
    paths = {"png": out_dir / "compare.png", "json": out_dir / "compare.json", "md": out_dir / "compare.md"}
    atomic_write_json(paths["json"], {"runs": [{"label": label, **g} for label, g in summary]})
    atomic_write_text(paths["md"], markdown_table(summary))
    plot_groups(summary, paths["png"], title)
    return paths
