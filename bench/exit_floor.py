"""How few loops can a per-token exit rule spend? Floors from the answers at every depth.

    python bench/exit_floor.py RUN [--difficulty 1..6] [--samples 1000] [--max-depth 16]

For a chains model (`data.kind: chains`), decodes the test problems of `--difficulty` (the same
fresh set `stars-eval depth --difficulty` draws) at every depth 1..max-depth, teacher-forced (equal
to greedy decoding while the earlier answer tokens are right), and prints, in loops per answer
token and as a fraction of the smallest depth within 0.5 points of the best:

- oracle (per problem): each problem at its first right depth (the `stars-eval --exit` oracle row);
- settled (per token): each token at the depth from which its argmax stays right up to max-depth;
- settled, t >= 2: the same, but never before the second loop. Every rule that compares two loops
  (`delta`, `kl`, `contraction`) needs two loops for every token, so this is their floor;
- settled + 1: each token one loop after its answer settled (a rule that waits one loop to see the
  answer stay put).
"""
from __future__ import annotations

import argparse

import torch


def settled_depth(right: torch.Tensor) -> torch.Tensor:
    """right [D, ...] (bool, depth 1..D first) -> the first depth d with right[d-1:] all true (D + 1 if none)."""
    D = right.shape[0]
    stays = right.flip(0).int().cumprod(0).flip(0).bool()  # stays[d] = right at every depth >= d + 1
    return torch.where(stays.any(0), D + 1 - stays.int().sum(0), torch.full_like(stays[0], D + 1, dtype=torch.long))


def main() -> None:
    from stars_scale.loss import IGNORE
    from stars_scale.data.chains import parse_difficulty
    from stars_scale.data.sources import build_task
    from stars_scale.eval.depth_scaling import oracle_exit
    from stars_scale.generate.load import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--difficulty", default="1..6")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--max-depth", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg, model, _ = load_model(args.run)
    batch = build_task(cfg, test_difficulty=parse_difficulty(args.difficulty), test_size=args.samples).test_batch()
    ids, labels = batch["input_ids"], batch["labels"]
    mask = labels != IGNORE
    tok_right = []
    with torch.no_grad():
        e = model.encode(ids)
        s = model.init_state(e, torch.Generator().manual_seed(0))
        for _ in range(args.max_depth):
            s = model.core_step(s, e)
            tok_right.append((model.decode(s).argmax(-1) == labels) | ~mask)
    R = torch.stack(tok_right)  # [D, problems, positions]
    problem_right = R.all(-1)
    acc = problem_right.double().mean(1)
    best = float(acc.max())
    ref = int((acc >= best - 0.005).nonzero()[0]) + 1
    ntok = mask.sum(1).double()
    oracle = oracle_exit(list(range(1, args.max_depth + 1)), dict(enumerate(problem_right, 1)), tokens=ntok)
    tok = settled_depth(R)[mask].double()
    rows = [("oracle, per problem (first right depth)", oracle["mean_loops"]),
            ("settled, per token", float(tok.mean())),
            ("settled, per token, t >= 2 (rules comparing two loops)", float(tok.clamp_min(2).mean())),
            ("settled + 1, per token", float((tok + 1).mean()))]
    print(f"{args.run}: {ids.shape[0]} problems, difficulty {args.difficulty}, {int(ntok.sum())} answer tokens; "
          f"best {100 * best:.1f}% (smallest depth within 0.5 points: r = {ref})")
    print(f"| floor | loops / token | % of r = {ref} |")
    print("|---|---|---|")
    for name, loops in rows:
        print(f"| {name} | {loops:.2f} | {100 * loops / ref:.0f}% |")


if __name__ == "__main__":
    main()
