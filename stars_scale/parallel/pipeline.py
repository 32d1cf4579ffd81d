"""Loop-aware pipeline parallelism: the core's blocks split over the stages, the state on a ring.

A looped model spends almost all of its compute in the core, so the stages split the core's
blocks (stage 0 also holds embedding, prelude and injection; the last stage also holds the
state norm, coda, final norm and head). One loop iteration traverses every stage; the state
returns from the last stage to the first for the next iteration:

    stage 0: s ─ inject(s, e) ─ core[0:k] ──► stage 1: core[k:2k] ──► … ──► stage P-1 ─┐
       ▲                                                                              │
       └────────────────────────── s_{t+1} (next iteration) ◄─────────────────────────┘

Every traversal of the ring is a *pass*: the r = n_free + n_grad loop iterations, then the
finite-difference evaluations of the core map for STARS (f(h), then f(h + εv) per power
iteration; their inputs are made on the last stage, where h = s_r lives). Free iterations
(truncated BPTT) run without a graph and need no backward; gradient-carrying iterations run
under `torch.utils.checkpoint` with `checkpointing: loop`.

Schedule. With M microbatches and P stages, pass k of microbatch m runs on stage s at tick

    t(m, k, s) = k · max(M, P) + m + s,

which respects both dependencies (stage s-1 of the same pass; the last stage of pass k-1 at
tick (k-1)·max(M,P) + m + P - 1 < k·max(M,P) + m) and gives every stage at most one task per
tick. With M ≥ P the stages are never idle between the first and the last pass: each stage works
K·M ticks of a span of K·M + P - 1, so the forward bubble is (P - 1) / (K·M + P - 1) for K passes;
the loop's depth multiplies the microbatches (bench/pipeline_bubble.py measures it). Each stage
processes its tasks in tick order (k outer, m inner) with non-blocking sends and blocking
receives, so the ring cannot deadlock. The backward is one `backward()` per stage and step (see
`p2p`): autograd replays the forward's communication in reverse; only gradient-carrying passes
take part.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stars_scale.config import StarsConfig
from stars_scale.parallel.p2p import Mailbox, recv_with_grad, send_with_grad
from stars_scale.parallel.tensor import vocab_parallel_ce
from stars_scale.stars.depth import Depth
from stars_scale.stars.jacobian import fd_epsilon, normalize_direction
from stars_scale.stars.regularizer import combine_loss
from stars_scale.train.step import (MicroResult, autocast_context, estimator_generator, init_state_generator,
                                    penalty_active, rho_wanted)


def stage_bounds(n_core: int, pp: int, pp_rank: int) -> tuple[int, int]:
    """Core blocks [lo, hi) of stage `pp_rank`: as even as possible, earlier stages one more."""
    base, extra = divmod(n_core, pp)
    lo = pp_rank * base + min(pp_rank, extra)
    return lo, lo + base + (1 if pp_rank < extra else 0)


class _TiedHead(nn.Module):
    """The tied head on a last stage without tensor parallelism: weight received each step."""

    def __init__(self) -> None:
        super().__init__()
        self.external_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.external_weight)


def split_stage(model, pp: int, pp_rank: int) -> tuple[int, int]:
    """Drop from `model` (in place) what stage `pp_rank` does not hold; return its core range.

    The tied head of the last stage keeps no parameter of its own: the first stage sends the
    embedding weight at the start of every step and receives the head's gradient for it in the
    same backward, so the tied weight has one copy, one gradient and one optimizer state.
    """
    lo, hi = stage_bounds(len(model.core), pp, pp_rank)
    if pp == 1:
        return lo, hi
    first, last = pp_rank == 0, pp_rank == pp - 1
    tied = model.cfg.tie_embeddings
    model.tied_shape = tuple(model.embed.weight.shape)
    model.core = nn.ModuleList(list(model.core)[lo:hi])
    if not first:
        model.embed = None
        model.pos_embed = None
        model.prelude = nn.ModuleList()
        model.adapter = None
    if not last:
        model.coda = nn.ModuleList()
        model.final_norm = None
        model.state_norm = None
        model.lm_head = None
        model.exit_gate = None
    elif tied:
        if isinstance(model.lm_head, nn.Linear):  # no tensor parallelism: a plain tied Linear
            model.lm_head = _TiedHead()
        else:
            model.lm_head._tied = None
            model.lm_head.inner.weight = None
    return lo, hi


@dataclass(frozen=True)
class Pass:
    kind: str  # "iter": a loop iteration; "fd": an evaluation of the core map for the estimator
    grad: bool


def pass_plan(depth: Depth, stars: StarsConfig, step: int) -> list[Pass]:
    """The ring passes of one microbatch in this step (identical on every rank)."""
    plan = [Pass("iter", False)] * depth.n_free + [Pass("iter", True)] * depth.n_grad
    if rho_wanted(stars, step):
        on = penalty_active(stars, step)
        plan += [Pass("fd", on)] + [Pass("fd", False)] * (stars.iters - 1 if on else stars.iters)
        if on:
            plan.append(Pass("fd", True))
    return plan


def penalty_draws(stars: StarsConfig, gen: torch.Generator, rows: int) -> tuple[torch.Tensor | None, int]:
    """The estimator's row subset and dropout seed, drawn as `core_map_penalty` draws them."""
    idx = None
    if stars.sample_fraction < 1.0:
        k = max(1, math.ceil(stars.sample_fraction * rows))
        idx = torch.randperm(rows, generator=gen)[:k]
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    return idx, seed


@dataclass
class _FD:
    x: torch.Tensor
    v: torch.Tensor
    eps: float
    y0: torch.Tensor | None = None
    jv: torch.Tensor | None = None


@dataclass
class StageStats:
    """Timing of this stage's last step (perf_counter is system-wide: comparable across ranks).

    The stage works from `start` to `end` except while blocked in a receive (`recv_wait_s`);
    with the spans of all stages, 1 - Σ busy / (P · (max end - min start)) is the bubble."""

    start: float = 0.0
    end: float = 0.0
    recv_wait_s: float = 0.0
    passes: int = 0

    @property
    def busy_s(self) -> float:
        return self.end - self.start - self.recv_wait_s


class LoopPipeline:
    """Runs one training step's microbatches over the ring; `backward(root)` once per stage."""

    def __init__(self, model, ps):
        self.model = model
        self.ps = ps
        self.tp = ps.tp
        self.first, self.last = ps.is_first_stage, ps.is_last_stage
        self.tied = model.cfg.tie_embeddings and ps.pp > 1
        self.stats = StageStats()

    # ------------------------------------------------------------------ pieces

    def _core_part(self, x: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        m = self.model
        if self.first:
            x = m.inject(x, e)
        for block in m.core:
            x = m._block(block, x)
        if self.last and m.state_norm is not None:
            x = m.state_norm(x)
        return x

    def _run(self, x, e, loop_ckpt: bool, dropout_seed: int | None) -> torch.Tensor:
        m = self.model
        fn = self._core_part
        if dropout_seed is not None and m.training and m.cfg.dropout > 0:
            inner = fn

            def fn(x, e):  # noqa: F811 - the same masks on every evaluation of the core map
                with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
                    torch.manual_seed(dropout_seed)
                    return inner(x, e)
        if loop_ckpt:
            return checkpoint(fn, x, e, use_reentrant=False)
        return fn(x, e)

    # ------------------------------------------------------------------ one step

    def forward_backward(self, batches: list[dict], depth: Depth, stars: StarsConfig, *, step: int,
                         micro_ids: list[int], seed: int, loss_scale: float, dtype: str,
                         backward) -> list[MicroResult]:
        ps, model = self.ps, self.model
        device = ps.device
        M = len(batches)
        plan = pass_plan(depth, stars, step)
        n_iter = depth.total
        n_fd = len(plan) - n_iter
        on = penalty_active(stars, step)
        mail = Mailbox()
        anchor = torch.zeros((), device=device, requires_grad=True)
        roots: list[torch.Tensor] = []
        first_rank, last_rank = ps.pp_ranks[0], ps.pp_ranks[-1]
        t_start = time.perf_counter()

        if self.tied:
            if self.first:
                roots.append(send_with_grad(model.embed.weight, last_rank, mail))
            if self.last:
                model.lm_head.external_weight = recv_with_grad(anchor, model.tied_shape, torch.float32, first_rank,
                                                               mail)

        gens = [estimator_generator(seed, step, mi) for mi in micro_ids]
        rows = [b["input_ids"].shape[0] for b in batches]
        seq = batches[0]["input_ids"].shape[1]
        hidden = model.cfg.hidden
        draws = [penalty_draws(stars, g, r) if n_fd else (None, None) for g, r in zip(gens, rows)]
        fd_rows = [r if d[0] is None else len(d[0]) for r, d in zip(rows, draws)]
        E: list = [None] * M
        E_pen: list = [None] * M
        fd: list = [None] * M
        results: list = [None] * M
        ce_of: list = [None] * M
        loop_ckpt = model.checkpointing == "loop" and model.training

        def shape(m: int, k: int):
            return (rows[m] if plan[k].kind == "iter" else fd_rows[m], seq, hidden)

        def in_grad_first(k: int) -> bool:  # does stage 0's input of pass k carry a graph?
            return k > 0 and plan[k].grad and plan[k].kind == "iter" and plan[k - 1].kind == "iter" \
                and plan[k - 1].grad

        with autocast_context(dtype, device):
            for k, p in enumerate(plan):
                for m in range(M):
                    # ---- input
                    if self.first:
                        if k == 0:
                            ids = batches[m]["input_ids"].to(device)
                            E[m] = model.encode(ids)
                            if n_fd:
                                idx = draws[m][0]
                                e_det = E[m].detach()
                                E_pen[m] = e_det if idx is None else e_det.index_select(0, idx.to(device))
                            x = model.init_state(E[m], init_state_generator(seed, step, micro_ids[m], device))
                        elif in_grad_first(k):
                            x = recv_with_grad(anchor, shape(m, k), torch.float32, last_rank, mail)
                        else:
                            x = mail.recv(shape(m, k), torch.float32, device, last_rank)
                        e = E[m] if p.kind == "iter" else E_pen[m]
                    else:
                        if p.grad:
                            x = recv_with_grad(anchor, shape(m, k), torch.float32, ps.prev_rank, mail)
                        else:
                            x = mail.recv(shape(m, k), torch.float32, device, ps.prev_rank)
                        e = None
                    # ---- compute
                    with torch.set_grad_enabled(p.grad):
                        y = self._run(x, e, loop_ckpt and p.grad and p.kind == "iter",
                                      draws[m][1] if p.kind == "fd" else None)
                    # ---- output
                    if not self.last:
                        if p.grad:
                            roots.append(send_with_grad(y.float(), ps.next_rank, mail))
                        else:
                            mail.isend(y.float(), ps.next_rank)
                    else:
                        nxt, nxt_grad = self._last_stage_after(m, k, y, plan, n_iter, n_fd, batches, stars, gens,
                                                               draws, fd, results, ce_of, on, device)
                        if nxt is not None:
                            if nxt_grad:
                                roots.append(send_with_grad(nxt.float(), first_rank, mail))
                            else:
                                mail.isend(nxt.float(), first_rank)

            if self.last:
                for m in range(M):
                    pen = results[m]
                    loss = combine_loss(ce_of[m], pen if (pen is not None and on) else None, stars)
                    roots.append(loss * loss_scale)
                    results[m] = (loss, pen)
        root = torch.stack([r.float() for r in roots]).sum()
        backward(root)
        mail.wait_all()
        self.stats = StageStats(start=t_start, end=time.perf_counter(), recv_wait_s=mail.recv_wait_s,
                                passes=len(plan))
        if self.tied and self.last:
            model.lm_head.external_weight = None
        if not self.last:
            return []
        out = []
        for m in range(M):
            loss, pen = results[m]
            out.append(MicroResult(loss=float(loss.detach()), ce=float(ce_of[m].detach()),
                                   penalty=None if pen is None else float(pen.detach()),
                                   rho=None if pen is None else float(pen.detach().sqrt()),
                                   tokens=batches[m]["input_ids"].numel()))
        return out

    def _last_stage_after(self, m, k, y, plan, n_iter, n_fd, batches, stars, gens, draws, fd, results, ce_of, on,
                          device):
        """After pass k of microbatch m on the last stage: the next pass's input (and whether it
        carries a graph back to stage 0), the loss pieces when the microbatch is done."""
        p = plan[k]
        if p.kind == "iter":
            if k < n_iter - 1:
                nxt_grad = p.grad and plan[k + 1].grad
                return (y if nxt_grad else y.detach()), nxt_grad
            with torch.set_grad_enabled(True):
                logits = self.model.decode(y)
                ce_of[m] = vocab_parallel_ce(logits, batches[m]["labels"].to(device), self.tp)
            if not n_fd:
                return None, False
            h = y.detach()
            idx = draws[m][0]
            if idx is not None:
                h = h.index_select(0, idx.to(device))
            v = torch.randn(h.shape, generator=gens[m], dtype=torch.float32).to(device=device, dtype=h.dtype)
            v = normalize_direction(v, stars.normalize)
            eps = stars.fd_eps if stars.fd_eps is not None else fd_epsilon(h)
            fd[m] = _FD(x=h, v=v, eps=eps, jv=v)
            return h, False
        st: _FD = fd[m]
        j = k - n_iter
        if j == 0:
            st.y0 = y
        elif p.grad:  # the last, differentiable evaluation
            st.jv = (y - st.y0) / st.eps
            st.v = normalize_direction(st.jv.detach(), stars.normalize)
        else:
            with torch.no_grad():
                st.jv = (y - st.y0.detach()) / st.eps
                st.v = normalize_direction(st.jv, stars.normalize)
        if j < n_fd - 1:
            return st.x + st.eps * st.v, False
        acc = st.jv.dtype if st.jv.dtype in (torch.float32, torch.float64) else torch.float32
        with torch.set_grad_enabled(on):
            sq = st.jv.pow(2).sum(dtype=acc)
        results[m] = sq if on else sq.detach()
        return None, False
