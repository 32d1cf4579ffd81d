"""Test-time scaling: how a trained looped model behaves as it loops more at inference.

For every depth r of the sweep, on a fixed test set:
- accuracy: exact match (tasks with an answer; arithmetic), else None;
- loss: mean cross-entropy over labelled tokens (perplexity = exp(loss));
- delta_h: mean over sequences of ‖s_r − s_{r−1}‖ / ‖s_{r−1}‖ (has the recurrence settled?);
- rho: ρ̂ of the core map at the end state s_r (forward-mode power iteration, `rho_iters`).

The sweep shares the loop: depths are visited in increasing order and the state is carried
from one depth to the next, so the whole sweep costs max(depths) iterations, not their sum.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from stars_scale.data.arithmetic import ArithmeticTask
from stars_scale.loss import IGNORE
from stars_scale.stars.jacobian import estimate_spectral_radius
from stars_scale.utils import atomic_write, atomic_write_json


@torch.no_grad()
def depth_sweep(model, batch: dict[str, torch.Tensor], depths: list[int], *, rho_iters: int = 20,
                rho_samples: int = 64, batch_size: int = 256, seed: int = 0,
                has_accuracy: bool = True) -> dict:
    if not depths:
        raise ValueError("depths must not be empty")
    depths = sorted(set(int(d) for d in depths))
    if depths[0] < 1:
        raise ValueError(f"depths must be >= 1, got {depths[0]}")
    was_training = model.training
    model.eval()
    n = batch["input_ids"].shape[0]
    acc_sum = {d: 0.0 for d in depths}
    loss_sum = {d: 0.0 for d in depths}
    tok_sum = 0
    dh_sum = {d: 0.0 for d in depths}
    rho = {}
    device = next(model.parameters()).device
    for start in range(0, n, batch_size):
        ids = batch["input_ids"][start:start + batch_size].to(device)
        labels = batch["labels"][start:start + batch_size].to(device)
        mask = labels != IGNORE
        tok_sum += int(mask.sum())
        gen = torch.Generator(device="cpu").manual_seed(seed)
        e = model.encode(ids)
        s = model.init_state(e, gen)
        t = 0
        for d in depths:
            while t < d:
                prev = s
                s = model.core_step(s, e)
                t += 1
            logits = model.decode(s).float()
            ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
            loss_sum[d] += float((ce * mask).sum())
            if has_accuracy:
                acc_sum[d] += float(ArithmeticTask.exact_match(logits, labels).sum())
            num = (s - prev).float().flatten(1).norm(dim=1)
            den = prev.float().flatten(1).norm(dim=1).clamp_min(1e-12)
            dh_sum[d] += float((num / den).sum())
            if start == 0:
                k = min(rho_samples, ids.shape[0])
                hs, es = s[:k], e[:k]
                rho[d] = float(estimate_spectral_radius(lambda h: model.core_step(h, es), hs, "jvp", rho_iters,
                                                        generator=torch.Generator().manual_seed(seed + 1)))
    model.train(was_training)
    return {
        "depths": depths,
        "accuracy": [acc_sum[d] / n for d in depths] if has_accuracy else None,
        "loss": [loss_sum[d] / max(tok_sum, 1) for d in depths],
        "perplexity": [math.exp(min(loss_sum[d] / max(tok_sum, 1), 50.0)) for d in depths],
        "rho": [rho[d] for d in depths],
        "delta_h": [dh_sum[d] / n for d in depths],
    }


def plot_depth_scaling(results: dict | list[tuple[str, dict]], path: Path, title: str = "") -> None:
    """Accuracy (or loss), ‖Δh‖ and ρ̂ against depth; several labelled runs share the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results if isinstance(results, list) else [("", results)]
    has_acc = any(r.get("accuracy") is not None for _, r in runs)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for label, r in runs:
        d = r["depths"]
        kw = {"marker": "o", "label": label or None}
        if has_acc and r.get("accuracy") is not None:
            axes[0].plot(d, [100 * a for a in r["accuracy"]], **kw)
        else:
            axes[0].plot(d, r["loss"], **kw)
        axes[1].plot(d, [max(x, 1e-12) for x in r["delta_h"]], **kw)
        axes[2].plot(d, r["rho"], **kw)
    axes[0].set_ylabel("exact match (%)" if has_acc else "loss")
    axes[1].set_ylabel("‖h_r − h_{r−1}‖ / ‖h_{r−1}‖")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("ρ̂ of the core map")
    axes[2].axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("loop depth r at test time")
        ax.grid(alpha=0.3)
    if any(label for label, _ in runs):
        axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def write_depth_scaling(results: dict, out_dir: Path, title: str = "") -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, ppath = out_dir / "depth_scaling.json", out_dir / "depth_scaling.png"
    atomic_write_json(jpath, results)
    plot_depth_scaling(results, ppath, title)
    return jpath, ppath


def load_depth_scaling(path: Path) -> dict:
    return json.loads(Path(path).read_text())
