"""Control for the chains task: does a plain (not looped) pre-LN causal transformer learn the lookups?

    python bench/chains_plain_control.py [--layers 3] [--difficulty 1..6] [--statements 18] [--matched]
        [--names slot] [--value-first] [--steps 800] [--embed-std 1.0]

Trains `--layers` distinct pre-LN blocks (d = 128, 4 heads, learned positions, tied head, AdamW lr 1e-3,
batch 64) on `stars_scale.data.chains` with dense labels, and prints the training loss and the test
exact match per difficulty every 100 steps. It is the yardstick for the looped model's recipes
(docs/chains_results.md): with slot names the lookups train in hundreds of steps here. Drawing every
weight at 0.02 as the looped model does (`--embed-std 0.02 --linear-std 0.02`) slows them down;
drawing only the embeddings at 0.02 slows them less. One torch thread; ~0.13 s a step on this machine.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from stars_scale.data.arithmetic import ArithmeticTask
from stars_scale.data.chains import ChainsTask, parse_difficulty
from stars_scale.loss import IGNORE


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.n1, self.n2 = heads, nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.n2(x))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--difficulty", default="1..6")
    ap.add_argument("--statements", type=int, default=18)
    ap.add_argument("--matched", action="store_true")
    ap.add_argument("--names", choices=("random", "slot"), default="slot")
    ap.add_argument("--value-first", action="store_true")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--embed-std", type=float, default=1.0, help="token/position embedding init std")
    ap.add_argument("--linear-std", type=float, default=None,
                    help="draw every linear weight from N(0, s^2) too (default: torch's init)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    lo, hi = parse_difficulty(args.difficulty)
    task = ChainsTask(statements=args.statements, variables=max(args.statements, 16), difficulty=(lo, hi),
                      test_difficulty=(lo, hi), matched=args.matched, names=args.names, value_first=args.value_first,
                      dense=True, test_size=500, seed=args.seed)
    d = 128
    emb, pos = nn.Embedding(task.vocab_size, d), nn.Embedding(task.seq_len, d)
    blocks, norm = nn.ModuleList(Block(d, 4) for _ in range(args.layers)), nn.LayerNorm(d)
    for m in (emb, pos):
        nn.init.normal_(m.weight, std=args.embed_std)
    for m in blocks.modules():
        if isinstance(m, nn.Linear) and args.linear_std is not None:
            nn.init.normal_(m.weight, std=args.linear_std)
            nn.init.zeros_(m.bias)
    params = [p for m in (emb, pos, blocks, norm) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98))

    def logits(ids: torch.Tensor) -> torch.Tensor:
        x = emb(ids) + pos(torch.arange(ids.shape[1]))
        for b in blocks:
            x = b(x)
        return norm(x) @ emb.weight.T

    t0 = time.time()
    for step in range(args.steps + 1):
        b = task.train_batch(step, 0, 64)
        loss = F.cross_entropy(logits(b["input_ids"]).flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                tb = task.test_batch()
                right = ArithmeticTask.exact_match(logits(tb["input_ids"]), tb["labels"]).float()
                per = [100 * right[tb["difficulty"] == k].mean().item() for k in range(lo, hi + 1)]
            print(f"step {step:5d}  loss {loss.item():.3f}  exact match % by difficulty {lo}..{hi}: "
                  + " ".join(f"{x:.0f}" for x in per) + f"  ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
