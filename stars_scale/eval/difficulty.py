"""Accuracy over difficulty × test-time depth: do more loops solve harder problems?

Input: a depth sweep run with `groups` = the difficulty of every test problem
(`depth_sweep(..., groups=batch["difficulty"])`). Output: a table (markdown), a heatmap (PNG,
colour scale 0–100 %), and per difficulty the first depth at which its exact match reaches the
threshold (90 % by default; None when no swept depth reaches it).
"""
from __future__ import annotations

from pathlib import Path

from stars_scale.utils import atomic_write, atomic_write_json, atomic_write_text


def first_depths(results: dict, threshold: float = 0.9) -> dict[str, int | None]:
    """Difficulty -> the smallest swept depth whose accuracy is >= threshold (None: none)."""
    out = {}
    for g, acc in results["accuracy_by_group"].items():
        out[g] = next((d for d, a in zip(results["depths"], acc) if a >= threshold), None)
    return out


def summarise(results: dict, threshold: float = 0.9) -> dict:
    """The grid, the first depth per difficulty and the best depth per difficulty, JSON-ready."""
    by = results["accuracy_by_group"]
    depths = results["depths"]
    best = {g: max(acc) for g, acc in by.items()}
    return {
        "depths": depths,
        "difficulties": [int(g) for g in by],
        "group_sizes": results["group_sizes"],
        "accuracy": {g: list(acc) for g, acc in by.items()},
        "threshold": threshold,
        "first_depth": first_depths(results, threshold),
        "best_accuracy": best,
        "best_depth": {g: depths[acc.index(best[g])] for g, acc in by.items()},
    }


def markdown_table(summary: dict) -> str:
    depths = summary["depths"]
    pct = round(100 * summary["threshold"])
    head = "| difficulty | n | " + " | ".join(f"r={d}" for d in depths) + f" | first r ≥ {pct}% |"
    lines = [head, "|" + "---|" * (len(depths) + 3)]
    for g in summary["accuracy"]:
        first = summary["first_depth"][g]
        cells = " | ".join(f"{100 * a:.1f}" for a in summary["accuracy"][g])
        lines.append(f"| {g} | {summary['group_sizes'][g]} | {cells} | {first if first is not None else '—'} |")
    return "\n".join(lines)


def plot_heatmap(summary: dict, path: Path, title: str = "", train_range: tuple[int, int] | None = None) -> None:
    """Exact match (%) as colour over difficulty (rows) × depth (columns), each cell labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(summary["accuracy"])
    depths = summary["depths"]
    grid = np.array([[100 * a for a in summary["accuracy"][g]] for g in groups])
    fig, ax = plt.subplots(figsize=(1.1 + 0.75 * len(depths), 1.2 + 0.42 * len(groups)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto", origin="lower")
    for i in range(len(groups)):
        for j in range(len(depths)):
            v = grid[i, j]
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="black" if v > 60 else "white")
        first = summary["first_depth"][groups[i]]
        if first is not None:
            j = depths.index(first)
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xticks(range(len(depths)), [str(d) for d in depths])
    labels = [g + (" (train)" if train_range and train_range[0] <= int(g) <= train_range[1] else "") for g in groups]
    ax.set_yticks(range(len(groups)), labels)
    ax.set_xlabel("loop depth r at test time")
    ax.set_ylabel("difficulty (lookups)")
    pct = round(100 * summary["threshold"])
    ax.set_title((title + "\n" if title else "") + f"exact match %; red box: first depth ≥ {pct}%", fontsize=9)
    fig.colorbar(im, ax=ax, label="exact match (%)")
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def write_difficulty(results: dict, out_dir: Path, title: str = "", threshold: float = 0.9,
                     train_range: tuple[int, int] | None = None) -> tuple[Path, Path, Path]:
    """`difficulty_depth.json` / `.md` / `.png` in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(results, threshold)
    if train_range:
        summary["train_difficulty"] = list(train_range)
    paths = out_dir / "difficulty_depth.json", out_dir / "difficulty_depth.md", out_dir / "difficulty_depth.png"
    atomic_write_json(paths[0], summary)
    atomic_write_text(paths[1], markdown_table(summary) + "\n")
    plot_heatmap(summary, paths[2], title, train_range)
    return paths
