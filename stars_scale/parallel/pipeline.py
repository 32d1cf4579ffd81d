"""Loop-aware pipeline parallelism: the core's blocks split over the stages, the state on a ring.

A looped model spends almost all of its compute in the core, so the stages split the core's
blocks (stage 0 also holds embedding, prelude and injection; the last stage also holds the
state norm, coda, final norm and head). `split_stage` cuts the plain model down to its stage, so
a stage runs the model's own code: `LoopedLM.loop_step` / `core_step` are then the stage's part
of one loop iteration. One iteration traverses every stage; the state returns from the last
stage to the first for the next iteration:

    stage 0: s ─ inject(s, e) ─ core[0:k] ──► stage 1: core[k:2k] ──► … ──► stage P-1 ─┐
       ▲                                                                              │
       └────────────────────────── s_{t+1} (next iteration) ◄─────────────────────────┘

Every traversal of the ring is a *pass*: the r = n_free + n_grad loop iterations, then the
evaluations of the core map for the STARS `fd` estimator. The estimator is
`stars.jacobian.FiniteDifference` (the one `fd` power iteration), held on the last stage where
h = s_r lives: it names the next point to evaluate, the ring evaluates the map there
(`stars.regularizer.core_map` on every stage: the same dropout handling as one process) and
hands the value back. Free iterations (truncated BPTT) run without a graph and need no backward.

Schedule. The microbatches go through the ring in *rounds* of G: the forward of every pass of
the round's microbatches, then one `backward()` per stage for the round (see `p2p`: autograd
replays the round's communication in reverse). Pass k of the round's microbatch m runs on
stage s at tick k · max(G, P) + m + s: every stage works K·G ticks of a span of K·G + P - 1 in
the forward (K passes) and the backward mirrors it. `1f1b` (the default) takes G = min(P, M):
a stage holds the activations of at most P microbatches, whatever M (flat in M); `gpipe` takes
G = M: every microbatch's activations are held until the step's one backward (growing with M),
with one fill and drain per step instead of one per round. Each stage processes its tasks in
tick order with non-blocking sends and blocking receives, so the ring cannot deadlock.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from stars_scale.config import StarsConfig
from stars_scale.parallel.layout import round_size
from stars_scale.parallel.p2p import Mailbox, recv_with_grad, send_with_grad
from stars_scale.parallel.tensor import vocab_parallel_ce
from stars_scale.stars.depth import Depth
from stars_scale.stars.jacobian import FiniteDifference, SpectralEstimate, fd_evaluation
from stars_scale.stars.regularizer import (Probe, combine_loss, core_map, draw_probe, fd_penalty,
                                           without_checkpointing)
from stars_scale.train.step import (MicroResult, autocast_context, estimator_generator, init_state_generator,
                                    penalty_active, rho_wanted)


def stage_bounds(n_core: int, pp: int, pp_rank: int) -> tuple[int, int]:
    """Core blocks [lo, hi) of stage `pp_rank`: as even as possible, earlier stages one more."""
    base, extra = divmod(n_core, pp)
    lo = pp_rank * base + min(pp_rank, extra)
    return lo, lo + base + (1 if pp_rank < extra else 0)


class TiedHead(nn.Module):
    """The tied head on a last stage without tensor parallelism: weight received each round."""

    def __init__(self) -> None:
        super().__init__()
        self.external_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.external_weight)


def split_stage(model, pp: int, pp_rank: int) -> tuple[int, int]:
    """Drop from `model` (in place) what stage `pp_rank` does not hold; return its core range.

    The tied head of the last stage keeps no parameter of its own: the first stage sends the
    embedding weight at the start of every round and receives the head's gradient for it in the
    same backward, so the tied weight has one copy, one gradient and one optimizer state.
    """
    lo, hi = stage_bounds(len(model.core), pp, pp_rank)
    if pp == 1:
        return lo, hi
    first, last = pp_rank == 0, pp_rank == pp - 1
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
    elif model.cfg.tie_embeddings:
        if isinstance(model.lm_head, nn.Linear):  # no tensor parallelism: a plain tied Linear
            model.lm_head = TiedHead()
        else:
            model.lm_head.receive_weight()
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
        n = stars.iters + 1
        plan += [Pass("fd", FiniteDifference.grad_at(i, n, on)) for i in range(n)]
    return plan


@dataclass
class StageStats:
    """Timing and held activations of this stage's last step (perf_counter is system-wide).

    The stage works from `start` to `end` except while blocked in a receive (`recv_wait_s`);
    with the spans of all stages, 1 - Σ busy / (P · (max end - min start)) is the bubble.
    `peak_saved_bytes`: the most bytes autograd held for backward at once (a round's saved
    tensors, unique storages, parameters excluded), measured with a saved-tensors hook."""

    start: float = 0.0
    end: float = 0.0
    recv_wait_s: float = 0.0
    passes: int = 0
    rounds: int = 0
    peak_saved_bytes: int = 0

    @property
    def busy_s(self) -> float:
        return self.end - self.start - self.recv_wait_s


class SavedBytes:
    """Bytes of the distinct storages autograd saves inside the context (parameters excluded)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in self.params:
            self.seen[st.data_ptr()] = max(self.seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


@dataclass
class _Micro:
    """One microbatch's state on this stage during a round."""

    batch: dict
    micro: int
    gen: torch.Generator  # the estimator's draws, the same on every rank
    probe: Probe | None
    e: torch.Tensor | None = None  # first stage: the prelude's output (with graph)
    e_probe: torch.Tensor | None = None  # first stage: the estimator's rows of e, detached
    fd: FiniteDifference | None = None  # last stage: the estimate in progress
    ce: torch.Tensor | None = None
    est: SpectralEstimate | None = None
    loss: torch.Tensor | None = None
    rows: int = 0
    probe_rows: int = 0


class LoopPipeline:
    """Runs one training step's microbatches over the ring, round by round."""

    def __init__(self, model, ps, schedule: str = "1f1b", measure: bool = False):
        self.model, self.ps, self.schedule, self.measure = model, ps, schedule, measure
        self.first, self.last = ps.is_first_stage, ps.is_last_stage
        self.tied = model.cfg.tie_embeddings and ps.pp > 1
        self.stats = StageStats()

    def backwards_per_step(self, microbatches: int) -> int:
        return -(-microbatches // round_size(self.schedule, self.ps.pp, microbatches))

    def forward_backward(self, batches: list[dict], depth: Depth, stars: StarsConfig, *, step: int,
                         micro_ids: list[int], seed: int, loss_scale: float, dtype: str,
                         backward) -> list[MicroResult]:
        plan = pass_plan(depth, stars, step)
        G = round_size(self.schedule, self.ps.pp, len(batches))
        stats = StageStats(start=time.perf_counter(), passes=len(plan))
        results: list[MicroResult] = []
        for lo in range(0, len(batches), G):
            mail = Mailbox()
            meter = SavedBytes(self.model) if self.measure else None
            results += self._round(batches[lo:lo + G], micro_ids[lo:lo + G], plan, depth, stars, step, seed,
                                   loss_scale, dtype, backward, mail, meter)
            stats.recv_wait_s += mail.recv_wait_s
            stats.rounds += 1
            if meter is not None:
                stats.peak_saved_bytes = max(stats.peak_saved_bytes, meter.total)
        stats.end = time.perf_counter()
        self.stats = stats
        return results

    # ------------------------------------------------------------------ one round

    def _round(self, batches, micro_ids, plan, depth, stars, step, seed, loss_scale, dtype, backward, mail,
               meter) -> list[MicroResult]:
        ps, model = self.ps, self.model
        n_fd = sum(p.kind == "fd" for p in plan)
        on = penalty_active(stars, step)
        anchor = torch.zeros((), device=ps.device, requires_grad=True)
        roots: list[torch.Tensor] = []
        mbs = []
        for b, mi in zip(batches, micro_ids):
            gen = estimator_generator(seed, step, mi)
            rows = b["input_ids"].shape[0]
            probe = draw_probe(stars, gen, rows) if n_fd else None
            probe_rows = rows if probe is None or probe.rows is None else len(probe.rows)
            mbs.append(_Micro(b, mi, gen, probe, rows=rows, probe_rows=probe_rows))
        with meter.hooks() if meter is not None else contextlib.nullcontext(), autocast_context(dtype, ps.device):
            if self.tied and self.first:
                roots.append(send_with_grad(model.embed.weight, ps.pp_ranks[-1], mail))
            if self.tied and self.last:
                model.lm_head.external_weight = recv_with_grad(anchor, model.tied_shape, torch.float32,
                                                               ps.pp_ranks[0], mail)
            for k, p in enumerate(plan):
                for mb in mbs:
                    x, e = self._input(mb, k, plan, step, seed, anchor, mail)
                    y = self._compute(mb, x, e, p)
                    if not self.last:
                        self._send(y, p.grad, ps.next_rank, roots, mail)
                    else:
                        nxt, grad = self._after(mb, k, plan, y, stars, on)
                        if nxt is not None:
                            self._send(nxt, grad, ps.pp_ranks[0], roots, mail)
            if self.last:
                for mb in mbs:
                    mb.est = mb.fd.result() if mb.fd is not None else None
                    mb.loss = combine_loss(mb.ce, mb.est.penalty if (mb.est is not None and on) else None, stars)
                    roots.append(mb.loss * loss_scale)
        backward(torch.stack([r.float() for r in roots]).sum())
        mail.wait_all()
        if self.tied and self.last:
            model.lm_head.external_weight = None
        if not self.last:
            return []
        return [MicroResult(loss=float(mb.loss.detach()), ce=float(mb.ce.detach()),
                            penalty=None if mb.est is None else float(mb.est.penalty.detach()),
                            rho=None if mb.est is None else float(mb.est.rho),
                            tokens=mb.batch["input_ids"].numel()) for mb in mbs]

    def _input(self, mb: _Micro, k: int, plan, step: int, seed: int, anchor, mail):
        """This stage's input of pass k (and e on the first stage): made, or received."""
        ps, model, p = self.ps, self.model, plan[k]
        shape = (mb.rows if p.kind == "iter" else mb.probe_rows, mb.batch["input_ids"].shape[1], model.cfg.hidden)
        if not self.first:
            grad_in = p.grad
            src = ps.prev_rank
        elif k == 0:
            mb.e = model.encode(mb.batch["input_ids"].to(ps.device))
            if mb.probe is not None:
                mb.e_probe = mb.probe.select(mb.e.detach())
            x = model.init_state(mb.e, init_state_generator(seed, step, mb.micro, ps.device))
            return x, mb.e
        else:  # from the last stage; with a graph only between two gradient-carrying iterations
            prev = plan[k - 1]
            grad_in = p.grad and p.kind == "iter" and prev.kind == "iter" and prev.grad
            src = ps.pp_ranks[-1]
        x = recv_with_grad(anchor, shape, torch.float32, src, mail) if grad_in else \
            mail.recv(shape, torch.float32, ps.device, src)
        e = None if not self.first else (mb.e if p.kind == "iter" else mb.e_probe)
        return x, e

    def _compute(self, mb: _Micro, x, e, p: Pass) -> torch.Tensor:
        """The stage's part of a loop iteration, or of one evaluation of the estimator's map."""
        if p.kind == "iter":
            with torch.set_grad_enabled(p.grad):
                return self.model.loop_step(x, e)
        with fd_evaluation(p.grad), without_checkpointing(self.model):
            return core_map(self.model, e, mb.probe.seed)(x)

    @staticmethod
    def _send(y: torch.Tensor, grad: bool, dst: int, roots: list, mail: Mailbox) -> None:
        if grad:
            roots.append(send_with_grad(y.float(), dst, mail))
        else:
            mail.isend(y.float(), dst)

    def _after(self, mb: _Micro, k: int, plan, y: torch.Tensor, stars: StarsConfig, on: bool):
        """Last stage, after pass k: the next pass's input (and whether it carries a graph back to
        stage 0); the loss after the last iteration; the estimator's step after an evaluation."""
        p = plan[k]
        if p.kind == "iter":
            if k + 1 < len(plan) and plan[k + 1].kind == "iter":
                grad = p.grad and plan[k + 1].grad
                return (y if grad else y.detach()), grad
            with torch.set_grad_enabled(True):
                logits = self.model.decode(y)
                mb.ce = vocab_parallel_ce(logits, mb.batch["labels"].to(self.ps.device), self.ps.tp,
                                          self.model.cfg.kernels, self.ps.tp_group)
            if mb.probe is None:
                return None, False
            mb.fd = fd_penalty(mb.probe.select(y.detach()), stars, create_graph=on, generator=mb.gen)
        else:
            mb.fd.take(y)
        return mb.fd.point(), False
