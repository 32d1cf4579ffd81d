"""Our training step against the STARS reference step, interleaved in one run.

    python bench/vs_reference.py [--depth 8] [--hidden 128] [--heads 4] [--batch 64] [--digits 5]
                                 [--steps 8] [--rounds 4] [--compile] [--threads N] [--profile K]
                                 [--clock wall|cpu]

The reference is re-implemented here from its description (njuyxw/STARS `train_addition`, see
/work/shared/DESIGN.md), not copied: token + learned position embeddings, one GPT block with
a fused QKV projection, sandwich LayerNorm (norm after each residual add), hand-written causal
attention with dropout on the weights, dropout 0.1 after the attention projection and the MLP,
GELU MLP, looped `depth` times with gradients through every iteration, a LayerNorm and a linear
head; the penalty takes the end state x_end = x.detach().requires_grad_(), v ~ N(0, I) normalised
over the whole tensor, y = block(x_end), v_J = autograd.grad(y, x_end, v, create_graph=True),
P = ‖v_J‖², loss (1-λ)·CE + λ·P with λ = 0.1; AdamW. Ours is `LoopedLM` with the same shapes
(sandwich LayerNorm, GELU, learned positions, no prelude/coda, injection none) through the
trainer's `forward_backward`; "reference arithmetic" adds math attention and dropout 0.1.

Every setting runs the same batch and depth; rounds interleave the settings so drift in machine
load hits them alike. Printed: median ms/step, and each setting's speed-up over the reference's
step with the same penalty (plain over plain, penalised over penalised). `--clock cpu` times each step by
the CPU time this process used (`time.process_time`) instead of the wall clock: on a machine
shared with other jobs, where this process gets a varying fraction of a core, that is the work a
step does, not its wait for a core (use `--threads 1` with it). `--profile K` then
profiles 3 steps of each setting (torch.profiler, CPU) and prints its K most expensive ops by
self time with their share of the step: what a ratio that misses its target is made of.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from stars_scale.config import config_from_dict
from stars_scale.data.arithmetic import IGNORE
from stars_scale.data.sources import build_task
from stars_scale.model.looped import LoopedLM
from stars_scale.parallel.compile import apply_compile
from stars_scale.stars.depth import Depth
from stars_scale.train.host_malloc import keep_freed_memory
from stars_scale.stars.objective import forward_backward

# ------------------------------------------------------------------ the reference, re-implemented


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int, p: float):
        super().__init__()
        self.heads, self.p = heads, p
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, mlp), nn.Linear(mlp, d)
        self.ln_attn_in, self.ln_attn_out = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ln_mlp_in, self.ln_mlp_out = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(p)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
        att = F.dropout(att.masked_fill(~causal, float("-inf")).softmax(dim=-1), self.p, self.training)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.drop(self.proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_attn_out(x + self.attention(self.ln_attn_in(x)))
        return self.ln_mlp_out(x + self.drop(self.out(F.gelu(self.fc(self.ln_mlp_in(x))))))


class RefLoopedTransformer(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, mlp: int, max_len: int, p: float = 0.1):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.block = RefBlock(d, heads, mlp, p)
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.drop = nn.Dropout(p)

    def forward(self, ids: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.drop(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))
        for _ in range(depth):
            x = self.block(x)
        return self.head(self.ln_f(x)), x


def reference_step(model, opt, ids, labels, depth: int, lam: float) -> None:
    logits, x = model(ids, depth)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    loss = ce
    if lam > 0:
        x_end = x.detach().requires_grad_()
        v = torch.randn_like(x_end)
        v = v / v.norm()
        y = model.block(x_end)
        (vj,) = torch.autograd.grad(y, x_end, v, create_graph=True)
        loss = (1 - lam) * ce + lam * vj.pow(2).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# ------------------------------------------------------------------ ours


def our_settings(compile_too: bool) -> dict[str, dict]:
    plain = {"lam": 0.0, "estimate_every": 0}
    vjp = {"lam": 0.1, "method": "vjp", "iters": 1}
    fd25 = {"lam": 0.1, "method": "fd", "iters": 1, "sample_fraction": 0.25}
    ref_arith = {"attention": "math", "dropout": 0.1}
    out = {
        "ours, plain": ({}, plain, "none"),
        "ours, vjp": ({}, vjp, "none"),
        "ours, vjp, reference arithmetic": (ref_arith, vjp, "none"),
        "ours, plain, reference arithmetic": (ref_arith, plain, "none"),
        "ours, fd 25% of sequences": ({}, fd25, "none"),
    }
    if compile_too:
        out.update({
            "ours, plain, compile block": ({}, plain, "block"),
            "ours, vjp, compile block": ({}, vjp, "block"),
            "ours, fd 25%, compile block": ({}, fd25, "block"),
            "ours, vjp, reference arithmetic, compile block": (ref_arith, vjp, "block"),
        })
    return out


def print_profile(name: str, fn, first_step: int, top: int, steps: int = 3) -> None:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            fn(first_step + i)
    ops = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ops)
    print(f"-- {name}: {total / 1e3 / steps:.1f} ms of op self time per step, "
          f"{sum(e.count for e in ops) / steps:.0f} ops per step")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"   {e.key[:40]:40s} {e.count / steps:6.0f} calls {100 * e.self_cpu_time_total / total:5.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=None, help="MLP width (default 4 x hidden)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--digits", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per setting per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="also time train.compile: block")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time steps by wall clock or by this process's CPU time (shared machine)")
    ap.add_argument("--profile", type=int, default=0, metavar="K", help="then print each setting's top K ops")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # the trainer's default; the reference runs with it too
    mlp = args.mlp or 4 * args.hidden
    base = {"model": {"vocab_size": 15, "hidden": args.hidden, "heads": args.heads, "mlp_hidden": mlp,
                      "max_seq_len": 3 * args.digits + 5, "norm": "layernorm", "norm_placement": "sandwich",
                      "mlp": "gelu", "positions": "learned", "injection": "none", "init_state": "embed"},
            "data": {"digits": args.digits, "batch_size": args.batch}}
    cfg0 = config_from_dict(base)
    task = build_task(cfg0)
    batch = task.train_batch(0, 0, args.batch)
    ids, labels = batch["input_ids"], batch["labels"]

    torch.manual_seed(0)
    ref = RefLoopedTransformer(15, args.hidden, args.heads, mlp, cfg0.model.max_seq_len).train()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
    runners = {
        "reference, plain": lambda i: reference_step(ref, ref_opt, ids, labels, args.depth, 0.0),
        "reference, vjp": lambda i: reference_step(ref, ref_opt, ids, labels, args.depth, 0.1),
    }
    for name, (model_over, stars_over, mode) in our_settings(args.compile).items():
        cfg = config_from_dict({**base, "model": {**base["model"], **model_over}, "stars": stars_over})
        torch.manual_seed(0)
        model = LoopedLM(cfg.model).train()
        apply_compile(model, mode)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run(i, model=model, opt=opt, stars=cfg.stars):
            forward_backward(model, batch, Depth(0, args.depth), stars, step=i, micro=0, seed=0, loss_scale=1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        runners[name] = run

    for name, fn in runners.items():  # warm-up (and compilation)
        for i in range(3):
            fn(i)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, fn in runners.items():
            for i in range(args.steps):
                t0 = clock()
                fn(r * args.steps + i)
                times[name].append(clock() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"depth {args.depth}, d={args.hidden}, {args.heads} heads, MLP {mlp}, batch {args.batch}x{task.seq_len}, "
          f"torch threads {torch.get_num_threads()}, {args.rounds}x{args.steps} steps per setting, {args.clock} clock")
    print(f"{'setting':48s} {'ms/step':>8s} {'speed-up vs reference':>22s}")
    for name, m in med.items():
        against = "reference, plain" if "plain" in name else "reference, vjp"
        print(f"{name:48s} {1000 * m:8.1f} {med[against] / m:21.2f}x")
    print(f"ours fd 25% / ours plain: {med['ours, fd 25% of sequences'] / med['ours, plain']:.2f}")
    if args.profile:
        for name, fn in runners.items():
            print_profile(name, fn, args.rounds * args.steps, args.profile)


if __name__ == "__main__":
    main()
