"""Test-time scaling: how a trained looped model behaves as it loops more at inference.

For every depth r of the sweep, on a fixed test set:
- accuracy: exact match (tasks with an answer; arithmetic), else None;
- loss: mean cross-entropy over labelled tokens (perplexity = exp(loss));
- delta_h: mean over sequences of ‖s_r − s_{r−1}‖ / ‖s_{r−1}‖ (has the recurrence settled?);
- rho: ρ̂ of the core map at the end state s_r (forward-mode power iteration, `rho_iters`);
- with `groups` (one integer per test problem, e.g. the chains task's difficulty): the accuracy of
  each group at every depth (`accuracy_by_group`, `group_sizes`);
- oracle (tasks with an answer): every problem decoded at the first swept depth that answers it
  right, the largest when none does -- the loops an exit rule that knew the answer would spend, a
  floor for every per-problem exit rule on this sweep (`oracle_exit`, per group too).

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
from stars_scale.utils import atomic_write_json


@torch.no_grad()
def depth_sweep(model, batch: dict[str, torch.Tensor], depths: list[int], *, rho_iters: int = 20,
                rho_samples: int = 64, batch_size: int = 256, seed: int = 0,
                has_accuracy: bool = True, groups: torch.Tensor | None = None) -> dict:
    if not depths:
        raise ValueError("depths must not be empty")
    depths = sorted(set(int(d) for d in depths))
    if depths[0] < 1:
        raise ValueError(f"depths must be >= 1, got {depths[0]}")
    was_training = model.training
    model.eval()
    n = batch["input_ids"].shape[0]
    loss_sum = {d: 0.0 for d in depths}
    tok_sum = 0
    dh_sum = {d: 0.0 for d in depths}
    rho = {}
    if groups is not None and (not has_accuracy or len(groups) != n):
        raise ValueError("groups needs exact-match accuracy and one group per test sample")
    keys = sorted(set(int(g) for g in groups)) if groups is not None else []
    right_at = {d: [] for d in depths}  # per-problem exact match: accuracy, per group, the oracle
    answer_tokens = []  # labelled (generated) tokens per problem: the oracle's loops are per token
    device = next(model.parameters()).device
    for start in range(0, n, batch_size):
        ids = batch["input_ids"][start:start + batch_size].to(device)
        labels = batch["labels"][start:start + batch_size].to(device)
        mask = labels != IGNORE
        tok_sum += int(mask.sum())
        answer_tokens.append(mask.sum(1).cpu())
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
                right_at[d].append(ArithmeticTask.exact_match(logits, labels).cpu().bool())
            num = (s - prev).float().flatten(1).norm(dim=1)
            den = prev.float().flatten(1).norm(dim=1).clamp_min(1e-12)
            dh_sum[d] += float((num / den).sum())
            if start == 0:
                k = min(rho_samples, ids.shape[0])
                hs, es = s[:k], e[:k]
                rho[d] = float(estimate_spectral_radius(lambda h: model.core_step(h, es), hs, "jvp", rho_iters,
                                                        generator=torch.Generator().manual_seed(seed + 1)))
    model.train(was_training)
    right = {d: torch.cat(right_at[d]) for d in depths} if has_accuracy else {}
    out = {
        "depths": depths,
        "accuracy": [int(right[d].sum()) / n for d in depths] if has_accuracy else None,
        "loss": [loss_sum[d] / max(tok_sum, 1) for d in depths],
        "perplexity": [math.exp(min(loss_sum[d] / max(tok_sum, 1), 50.0)) for d in depths],
        "rho": [rho[d] for d in depths],
        "delta_h": [dh_sum[d] / n for d in depths],
    }
    if groups is not None:
        sizes = {g: int((groups == g).sum()) for g in keys}
        out["group_sizes"] = {str(g): sizes[g] for g in keys}
        out["accuracy_by_group"] = {str(g): [int(right[d][groups == g].sum()) / sizes[g] for d in depths]
                                    for g in keys}
    if has_accuracy:
        out["oracle_exit"] = oracle_exit(depths, right, groups, torch.cat(answer_tokens))
    return out


def accuracy_and_loops(right: torch.Tensor, loops: torch.Tensor, tokens: torch.Tensor,
                       groups: torch.Tensor | None = None) -> dict:
    """Per problem: `right` (bool), `loops` (summed over its tokens), `tokens`. Exact match and mean
    loops per token over all problems and, with `groups`, per group (`by_group`, keyed by str)."""
    loops, tokens = loops.double(), tokens.double()

    def stats(m: torch.Tensor) -> dict:
        return {"accuracy": float(right[m].double().mean()), "mean_loops": float(loops[m].sum() / tokens[m].sum())}

    out = stats(torch.ones(len(right), dtype=torch.bool))
    if groups is not None:
        out["by_group"] = {str(int(g)): stats(groups == g) for g in sorted(set(groups.tolist()))}
    return out


def oracle_exit(depths: list[int], right: dict[int, torch.Tensor], groups: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None) -> dict:
    """Each problem at the first of `depths` (ascending) where `right[d]` (bool per problem) holds, the
    largest depth where none does: the accuracy (right at some swept depth) and the mean loops per
    token of that oracle (each problem's loops weighted by its `tokens`, default 1), overall and
    per group."""
    n = len(right[depths[0]])
    w = torch.ones(n, dtype=torch.float64) if tokens is None else tokens.double()
    first = torch.full((n,), depths[-1], dtype=torch.float64)
    solved = torch.zeros(n, dtype=torch.bool)
    for d in depths:
        new = right[d] & ~solved
        first[new] = d
        solved |= new
    return accuracy_and_loops(solved, first * w, w, groups)


def plot_depth_scaling(results: dict | list[tuple[str, dict]], path: Path, title: str = "") -> None:
    """Accuracy (or loss), ‖Δh‖ and ρ̂ against depth; several labelled runs share the axes."""
    from stars_scale.eval.compare import plot_groups, summarize_group

    runs = results if isinstance(results, list) else [("", results)]
    plot_groups([(label, summarize_group([r])) for label, r in runs], path, title)


def write_json_and_png(results: dict, out_dir: Path, stem: str, plot, title: str = "") -> tuple[Path, Path]:
    """`<stem>.json` (the results) and `<stem>.png` (`plot(results, path, title)`) in out_dir, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, ppath = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    atomic_write_json(jpath, results)
    plot(results, ppath, title)
    return jpath, ppath


def write_depth_scaling(results: dict, out_dir: Path, title: str = "") -> tuple[Path, Path]:
    return write_json_and_png(results, out_dir, "depth_scaling", plot_depth_scaling, title)


def load_depth_scaling(path: Path) -> dict:
    return json.loads(Path(path).read_text())
