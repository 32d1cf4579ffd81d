"""Hidden-state trajectories across loop iterations, projected on their first two principal components.

For each of a few examples, the state s_0 (the initial state), s_1, ..., s_R of the loop is
recorded (the whole sequence's state, flattened to one vector of seq_len x hidden), the
trajectory is centred and projected on its own first two principal components (an SVD of the
R+1 points), and drawn as a path: a model whose loop converges spirals into a point, one that
diverges or oscillates keeps moving. This is the PCA figure of the STARS paper, per example.
Where the batch has exact-match answers, the iterations at which the example's answer is
right are marked, so the picture shows where along the path the model "knows" the answer.
"""
from __future__ import annotations

from pathlib import Path

import torch

from stars_scale.data.arithmetic import ArithmeticTask
from stars_scale.eval.depth_scaling import write_json_and_png
from stars_scale.loss import IGNORE
from stars_scale.utils import atomic_write


@torch.no_grad()
def state_trajectories(model, ids: torch.Tensor, labels: torch.Tensor | None, depth: int, *,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """States s_0..s_depth of each sequence, shape (n, depth + 1, seq_len * hidden), and, when
    `labels` are given, whether each sequence's answer is an exact match at each t (n, depth + 1)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    was_training = model.training
    model.eval()
    e = model.encode(ids)
    s = model.init_state(e, torch.Generator(device="cpu").manual_seed(seed))
    states, correct = [s.float().flatten(1)], []
    if labels is not None:
        correct.append(ArithmeticTask.exact_match(model.decode(s).float(), labels))
    for _ in range(depth):
        s = model.core_step(s, e)
        states.append(s.float().flatten(1))
        if labels is not None:
            correct.append(ArithmeticTask.exact_match(model.decode(s).float(), labels))
    model.train(was_training)
    return torch.stack(states, 1), (torch.stack(correct, 1).bool() if labels is not None else None)


def pca_2d(traj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project each trajectory (n, T, D) on its own first two principal components.

    Returns the coordinates (n, T, 2) and the fraction of the trajectory's variance each of the
    two components explains (n, 2). A trajectory with fewer than 3 points or no variance gets
    zeros where a component does not exist."""
    x = traj.double() - traj.double().mean(dim=1, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    k = min(2, s.shape[1])
    coords = torch.zeros(*x.shape[:2], 2, dtype=torch.float64)
    coords[..., :k] = u[..., :k] * s[:, None, :k]
    total = (s ** 2).sum(dim=1, keepdim=True)
    explained = torch.zeros(x.shape[0], 2, dtype=torch.float64)
    explained[:, :k] = torch.where(total > 0, s[:, :k] ** 2 / total.clamp_min(1e-300), torch.zeros_like(s[:, :k]))
    return coords.float(), explained.float()


def state_pca(model, batch: dict[str, torch.Tensor], depth: int, *, examples: int = 4, seed: int = 0,
              has_accuracy: bool = True, titles: list[str] | None = None) -> dict:
    """The PCA of `examples` sequences' (spread over the batch) state trajectories over `depth` iterations, as a
    JSON-ready dict: per example its 2-D path, explained variance, ‖s_t − s_{t−1}‖/‖s_{t−1}‖ and
    (with answers) the exact-match flag at every iteration."""
    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    device = next(model.parameters()).device
    pick = example_indices(batch["input_ids"].shape[0], examples)
    ids = batch["input_ids"][pick].to(device)
    labels = batch["labels"][pick].to(device) if has_accuracy else None
    traj, correct = state_trajectories(model, ids, labels, depth, seed=seed)
    coords, explained = pca_2d(traj.cpu())
    step = (traj[:, 1:] - traj[:, :-1]).norm(dim=-1) / traj[:, :-1].norm(dim=-1).clamp_min(1e-12)
    out = []
    for i in range(ids.shape[0]):
        ex = {"title": titles[i] if titles else f"example {i}", "pc": coords[i].tolist(),
              "explained": explained[i].tolist(), "delta_h": step[i].cpu().tolist()}
        if correct is not None:
            ex["correct"] = correct[i].cpu().tolist()
        out.append(ex)
    return {"depth": depth, "iterations": list(range(depth + 1)), "examples": out}


def example_indices(n: int, examples: int) -> torch.Tensor:
    """`examples` indices spread evenly over a batch of n (test sets are often sorted)."""
    return torch.linspace(0, n - 1, min(examples, n)).round().long()


def arithmetic_titles(batch: dict[str, torch.Tensor], examples: int) -> list[str]:
    """The prompt of each example `state_pca` picks ("123+456="), for the panel titles."""
    from stars_scale.data.arithmetic import decode_tokens

    titles = []
    pick = example_indices(batch["input_ids"].shape[0], examples)
    for ids, labels in zip(batch["input_ids"][pick], batch["labels"][pick]):
        # labels are shifted by one: the first labelled position is the prompt's last token ("=")
        end = int((labels != IGNORE).nonzero()[0]) + 1 if (labels != IGNORE).any() else len(ids)
        titles.append(decode_tokens(ids[:end]).strip())
    return titles


def plot_state_pca(res: dict, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exs = res["examples"]
    cols = min(4, len(exs))
    rows = (len(exs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1, 3.4 * rows + 0.4), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("viridis")
    n = res["depth"]
    for ax, ex in zip(axes.flat, exs):
        pc = ex["pc"]
        xs, ys = [p[0] for p in pc], [p[1] for p in pc]
        ax.plot(xs, ys, color="grey", lw=0.6, zorder=1)
        ok = ex.get("correct")
        for t in range(len(pc)):
            filled = ok is None or ok[t]
            ax.scatter(xs[t], ys[t], s=22, zorder=2, color=cmap(t / max(n, 1)) if filled else "none",
                       edgecolors=cmap(t / max(n, 1)), linewidths=0.9)
        ax.annotate("0", (xs[0], ys[0]), fontsize=7)
        ax.annotate(str(n), (xs[-1], ys[-1]), fontsize=7)
        ev = ex["explained"]
        ax.set_title(f"{ex['title']}", fontsize=9)
        ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f}%)", fontsize=8)
        ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}%)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(exs):]:
        ax.axis("off")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, n))
    fig.colorbar(sm, ax=axes, label="loop iteration", shrink=0.8)
    note = "filled: answer exact at that iteration; hollow: wrong" if exs and "correct" in exs[0] else ""
    fig.suptitle("  ".join(x for x in (title, "hidden-state trajectory, first two PCs", note) if x), fontsize=9)
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def write_state_pca(res: dict, out_dir: Path, title: str = "") -> tuple[Path, Path]:
    return write_json_and_png(res, out_dir, "states_pca", plot_state_pca, title)
