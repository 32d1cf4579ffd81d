"""Loop-aware pipeline parallelism: the core's blocks split over the stages, the state on a ring.

A looped model spends almost all of its compute in the core, so the stages split the core's
blocks (stage 0 also holds embedding, prelude and injection; the last stage also holds the
state norm, coda, final norm and head). `split_stage` cuts the plain model down to its stage, so
a stage runs the model's own code: `LoopedLM.loop_step` / `core_step` are then the stage's part
of one loop iteration (a later stage's `inject` passes the state through: stage 0 injected e).
One iteration traverses every stage; the state returns from the last stage to the first for the
next iteration:

    stage 0: s ─ inject(s, e) ─ core[0:k] ──► stage 1: core[k:2k] ──► … ──► stage P-1 ─┐
       ▲                                                                              │
       └────────────────────────── s_{t+1} (next iteration) ◄─────────────────────────┘

Every traversal of the ring is a *pass*: the r = n_free + n_grad loop iterations, then the
evaluations of the core map for the STARS `fd` estimator. The microbatch's objective (CE, the
penalty's gate, the estimate's options, their combination) is `stars.objective.Objective`, the
one-process step's. The estimator is `stars.jacobian.FiniteDifference` (the one `fd` power
iteration), held on the last stage where h = s_r lives: it names the next point to evaluate,
the ring evaluates the map there (`stars.regularizer.core_map` on every stage, under
`Objective.evaluation`: the same dropout handling and probe precision as one process) and
hands the value back. Free iterations (truncated BPTT) run without a graph and need no backward.

Schedule (`schedule.py`). Every stage runs a list of tasks computed identically on every rank:
F(m, k), the forward of pass k of microbatch m, and B(m, k), its backward: a manual
`torch.autograd.grad` from the pass's output with the gradient that the next stage (or, for the
state going round, stage 0) sent back, giving the parameters' gradients and the input's, which
goes to the stage the input came from. `1f1b` is Megatron's interleaved order with the passes
as virtual stages (about P microbatches' passes held); `gpipe` runs every forward first.

The parameters' gradients go straight into `.grad` (zero 0), or, under DeepSpeed, are summed in a
buffer and handed over in one backward per step (`sum(p · g)`, whose gradient is g exactly), so
DeepSpeed's accumulation sees one backward call whatever the schedule. The last stage's loss is
differentiated as soon as the microbatch's last pass is done, so its decode graph is never held.
e (stage 0) and the tied head's weight (last stage) are leaves whose gradients are summed over
the passes and sent on at the end.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from stars_scale.config import StarsConfig
from stars_scale.parallel.p2p import Channels
from stars_scale.parallel.schedule import Task, build, linked, max_in_flight, simulated_ticks
from stars_scale.stars.depth import Depth
from stars_scale.stars.jacobian import FiniteDifference, SpectralEstimate
from stars_scale.stars.objective import (CE, MicroResult, Objective, autocast_context, estimator_generator,
                                         init_state_generator, penalty_active, rho_wanted)
from stars_scale.stars.regularizer import Probe, core_map, draw_probe, without_checkpointing


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


def _injected_upstream(s: torch.Tensor, e: None) -> torch.Tensor:
    """`inject` of a stage after the first: the first stage injected e into the state already."""
    return s


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
    if not first:  # stage 0 injects e; the state arrives here injected, and e is None
        model.embed = None
        model.pos_embed = None
        model.prelude = nn.ModuleList()
        model.adapter = None
        model.inject = _injected_upstream
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
    """Timing, held activations and schedule of this stage's last step (perf_counter is system-wide).

    The stage works from `start` to `end` except while blocked in a receive (`recv_wait_s`);
    with the spans of all stages, 1 - Σ busy / (P · (max end - min start)) is the measured bubble.
    `peak_saved_bytes`: the most bytes autograd held for backward at once (unique storages,
    parameters excluded; `HeldBytes`; 0 unless measuring). `in_flight`: the most microbatches this
    stage's task list has started and not finished at once; `ticks`: the schedule replayed in unit
    ticks (every task one tick): the step's span and this stage's idle ticks in it."""

    start: float
    in_flight: int
    ticks: tuple[int, int]
    end: float = 0.0
    recv_wait_s: float = 0.0
    peak_saved_bytes: int = 0

    @property
    def busy_s(self) -> float:
        return self.end - self.start - self.recv_wait_s


class HeldBytes:
    """Bytes of the distinct storages autograd holds for backward, by owner (a pass of a
    microbatch, its encoding, its loss), parameters excluded: saved while recording for an owner,
    released when the owner's backward is done (`free`); `peak` is the most held at once, taken
    at `update_peak` (after each forward)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.held: dict[object, dict[int, int]] = {}
        self.owner: object = None
        self.peak = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if self.owner is not None and ptr not in self.params:
            mine = self.held.setdefault(self.owner, {})
            mine[ptr] = max(mine.get(ptr, 0), st.nbytes())
        return t

    @contextlib.contextmanager
    def recording(self, owner):
        prev, self.owner = self.owner, owner
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield
        finally:
            self.owner = prev

    def update_peak(self) -> None:
        seen: dict[int, int] = {}
        for mine in self.held.values():
            for ptr, n in mine.items():
                seen[ptr] = max(seen.get(ptr, 0), n)
        self.peak = max(self.peak, sum(seen.values()))

    def free(self, owner) -> None:
        self.held.pop(owner, None)


@dataclass
class _Micro:
    """One microbatch's state on this stage during the step."""

    batch: dict
    index: int  # its place in this step's list (names its messages)
    micro: int  # the global microbatch id (seeds its draws)
    gen: torch.Generator  # the estimator's draws, the same on every rank
    probe: Probe | None
    rows: int
    probe_rows: int
    e: torch.Tensor | None = None  # first stage: the prelude's output (graph root of the encoding)
    e_leaf: torch.Tensor | None = None  # first stage: e as a leaf, used by the iterations
    e_grad: torch.Tensor | None = None
    e_probe: torch.Tensor | None = None  # first stage: the estimator's rows of e, detached
    fd: FiniteDifference | None = None  # last stage: the estimate in progress
    ce: torch.Tensor | None = None
    est: SpectralEstimate | None = None
    loss: torch.Tensor | None = None
    leaves: dict = field(default_factory=dict)  # last stage: pass -> its output as a leaf of the loss
    out_grads: dict = field(default_factory=dict)  # last stage: pass -> the loss's gradient of its output
    saved: dict = field(default_factory=dict)  # pass -> (output, input leaf or None): for its backward
    backwards_left: int = 0


def sent_by(stage: int, task: Task, pp: int, plan: list[Pass]) -> list[tuple[int, tuple]]:
    """(destination stage, message name) of what `stage` sends when it runs `task`."""
    m, k = task.micro, task.k
    if task.op == "F":
        if stage < pp - 1:
            return [(stage + 1, ("x", m, k))]
        return [(0, ("x", m, k + 1))] if k + 1 < len(plan) else []
    if stage > 0:
        return [(stage - 1, ("g", m, k))]
    return [(pp - 1, ("g", m, k - 1))] if k >= 1 and _linked(plan, k - 1) else []


def _linked(plan: list[Pass], k: int) -> bool:
    return linked(tuple(p.grad for p in plan), tuple(p.kind == "iter" for p in plan), k)


class LoopPipeline:
    """Runs one training step's microbatches over the ring, task by task (`schedule.build`)."""

    def __init__(self, model, ps, schedule: str = "1f1b", measure: bool = False):
        self.model, self.ps, self.schedule, self.measure = model, ps, schedule, measure
        self.first, self.last = ps.is_first_stage, ps.is_last_stage
        self.tied = model.cfg.tie_embeddings and ps.pp > 1
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.stats: StageStats | None = None  # the last step's

    def forward_backward(self, batches: list[dict], depth: Depth, stars: StarsConfig, *, step: int,
                         micro_ids: list[int], seed: int, loss_scale: float, dtype: str,
                         backward, ce_fn: CE | None = None) -> list[MicroResult]:
        """The step's microbatches through the ring. `backward(root)`: the optimizer's backward,
        called once with a root whose gradient is the step's (DeepSpeed counts its calls); None:
        the gradients are added to the parameters' `.grad` as the passes' backwards make them
        (no second copy of the gradients). `ce_fn(logits, labels)`: the last stage's CE (the
        engine's vocab-parallel one under tensor parallelism); the rest of the microbatch's
        objective is `stars.objective.Objective`'s, as on one process."""
        ps, P = self.ps, self.ps.pp
        objective = Objective(stars, step, self.model.cfg.kernels, ce_fn)
        plan = pass_plan(depth, stars, step)
        grads, iters = tuple(p.grad for p in plan), tuple(p.kind == "iter" for p in plan)
        order = build(P, len(batches), grads, iters, self.schedule)
        mine = order[ps.pp_rank]
        span, idle = simulated_ticks(P, order, grads, iters)
        stats = StageStats(time.perf_counter(), max_in_flight(mine, sum(grads), len(plan)), (span, idle[ps.pp_rank]))
        mbs = [self._micro(i, b, mi, stars, step, seed, any(p.kind == "fd" for p in plan), sum(grads))
               for i, (b, mi) in enumerate(zip(batches, micro_ids))]
        net = self._channels(order, plan, mbs)
        meter = HeldBytes(self.model) if self.measure else None
        acc: dict[nn.Parameter, torch.Tensor] | None = {} if backward is not None else None
        run = _Step(self, plan, mbs, net, meter, acc, objective, seed, loss_scale, dtype)
        run.open()
        for task in mine:
            (run.forward if task.op == "F" else run.backward)(task)
        run.close()
        net.close()
        if backward is not None:
            backward(sum((p * g).sum() for p, g in acc.items()))
        stats.recv_wait_s = net.recv_wait_s
        stats.peak_saved_bytes = meter.peak if meter is not None else 0
        stats.end = time.perf_counter()
        self.stats = stats
        if not self.last:
            return []
        return [objective.result(mb.loss, mb.ce, mb.est, mb.batch["input_ids"].numel()) for mb in mbs]

    def _micro(self, index: int, b: dict, mi: int, stars: StarsConfig, step: int, seed: int, fd: bool,
               backwards: int) -> _Micro:
        gen = estimator_generator(seed, step, mi)
        rows = b["input_ids"].shape[0]
        probe = draw_probe(stars, gen, rows) if fd else None
        probe_rows = rows if probe is None or probe.rows is None else len(probe.rows)
        return _Micro(b, index, mi, gen, probe, rows, probe_rows, backwards_left=backwards)

    def _channels(self, order, plan: list[Pass], mbs: list[_Micro]) -> Channels:
        """What each stage sends to this one, in the order it sends it (every rank knows every list)."""
        ps, P, me = self.ps, self.ps.pp, self.ps.pp_rank
        incoming: dict[int, list] = {ps.pp_ranks[s]: [] for s in range(P) if s != me}
        if self.tied and self.last:
            incoming[ps.pp_ranks[0]].append(("w",))
        for s in range(P):
            for task in order[s]:
                for dst, name in sent_by(s, task, P, plan):
                    if dst == me:
                        incoming[ps.pp_ranks[s]].append(name)
        if self.tied and self.first:
            incoming[ps.pp_ranks[-1]].append(("wg",))
        hidden = self.model.cfg.hidden

        def shape(name):
            if name[0] in ("w", "wg"):
                return self.model.tied_shape
            mb, k = mbs[name[1]], name[2]
            return (mb.rows if plan[k].kind == "iter" else mb.probe_rows, mb.batch["input_ids"].shape[1], hidden)

        return Channels(incoming, shape, ps.device)


class _Step:
    """One step's tasks on this stage (the state `LoopPipeline.forward_backward` threads through)."""

    def __init__(self, pipe: LoopPipeline, plan, mbs, net: Channels, meter: HeldBytes | None, acc: dict,
                 objective: Objective, seed: int, loss_scale: float, dtype: str):
        self.pipe, self.model, self.ps = pipe, pipe.model, pipe.ps
        self.plan, self.mbs, self.net, self.meter, self.acc = plan, mbs, net, meter, acc
        self.objective, self.step = objective, objective.step
        self.seed, self.loss_scale, self.dtype = seed, loss_scale, dtype
        self.weight: torch.Tensor | None = None  # last stage, tied head: the embedding weight, a leaf

    def _record(self, owner):
        return self.meter.recording(owner) if self.meter is not None else contextlib.nullcontext()

    def _accumulate(self, params: list, grads) -> None:
        for p, g in zip(params, grads):
            if g is None:
                continue
            if self.acc is None:  # straight into .grad (autograd.grad's results are fresh tensors)
                p.grad = g if p.grad is None else p.grad.add_(g)
            else:
                self.acc[p] = g if p not in self.acc else self.acc[p] + g

    def _grad(self, outputs, out_grads, leaves: list) -> list:
        """Gradients of `outputs` (given theirs) for `leaves` (None where unused); the parameters'
        go into the step's buffer."""
        params = self.pipe.params
        got = torch.autograd.grad(outputs, leaves + params, out_grads, allow_unused=True)
        self._accumulate(params, got[len(leaves):])
        return list(got[:len(leaves)])

    # ------------------------------------------------------------------ tied head, step ends

    def open(self) -> None:
        ps, pipe = self.ps, self.pipe
        if pipe.tied and pipe.first:
            self.net.send(self.model.embed.weight, ps.pp_ranks[-1])
        if pipe.tied and pipe.last:
            self.weight = self.net.recv(ps.pp_ranks[0], ("w",)).requires_grad_()
            self.model.lm_head.external_weight = self.weight

    def close(self) -> None:
        ps, pipe = self.ps, self.pipe
        if pipe.tied and pipe.last:
            g = self.weight.grad if self.weight.grad is not None else torch.zeros_like(self.weight)
            self.net.send(g, ps.pp_ranks[0])
            self.model.lm_head.external_weight = None
        if pipe.tied and pipe.first:
            g = self.net.recv(ps.pp_ranks[-1], ("wg",))
            self._accumulate([self.model.embed.weight], [g])

    # ------------------------------------------------------------------ forward of a pass

    def forward(self, task: Task) -> None:
        mb, k, p = self.mbs[task.micro], task.k, self.plan[task.k]
        with self._record(("pass", task.micro, k)), autocast_context(self.dtype, self.ps.device):
            x, leaf, e = self._input(mb, k)
            y = self.pipe_compute(mb, x, e, p).float()
        if p.grad:
            mb.saved[k] = (y, leaf)
        if not self.pipe.last:
            self.net.send(y, self.ps.next_rank)
        else:
            nxt = self._after(mb, k, y)
            if nxt is not None:
                self.net.send(nxt, self.ps.pp_ranks[0])
        if self.meter is not None:
            self.meter.update_peak()
        if self.pipe.last and k == len(self.plan) - 1:
            self._loss_backward(mb)
        if mb.backwards_left == 0 and k == len(self.plan) - 1:
            self._finish(mb)

    def pipe_compute(self, mb: _Micro, x, e, p: Pass) -> torch.Tensor:
        """The stage's part of a loop iteration, or of one evaluation of the estimator's map."""
        if p.kind == "iter":
            with torch.set_grad_enabled(p.grad):
                return self.model.loop_step(x, e)
        with self.objective.evaluation(p.grad), without_checkpointing(self.model):
            return core_map(self.model, e, mb.probe.seed)(x)

    def _input(self, mb: _Micro, k: int):
        """This stage's input of pass k (the leaf to send the gradient of, if any) and e."""
        ps, model, p = self.ps, self.model, self.plan[k]
        if self.pipe.first and k == 0:
            with self._record(("encode", mb.index)):
                mb.e = model.encode(mb.batch["input_ids"].to(ps.device))
            mb.e_leaf = mb.e.detach().requires_grad_()
            if mb.probe is not None:
                mb.e_probe = mb.probe.select(mb.e.detach())
            with torch.set_grad_enabled(p.grad):
                x = model.init_state(mb.e_leaf, init_state_generator(self.seed, self.step, mb.micro, ps.device))
            return x, None, mb.e_leaf
        src = ps.prev_rank if not self.pipe.first else ps.pp_ranks[-1]
        x = self.net.recv(src, ("x", mb.index, k))
        # stage 0 receives the state with a graph only between two gradient-carrying iterations
        leaf = p.grad and (not self.pipe.first or _linked(self.plan, k - 1))
        if leaf:
            x.requires_grad_()
        e = None if not self.pipe.first else (mb.e_leaf if p.kind == "iter" else mb.e_probe)
        return x, (x if leaf else None), e

    def _after(self, mb: _Micro, k: int, y: torch.Tensor):
        """Last stage, after pass k: the next pass's input; the loss's pieces (ce after the last
        iteration, the estimator's step after an evaluation) from leaves of the outputs."""
        p, plan = self.plan[k], self.plan
        if p.kind == "iter" and k + 1 < len(plan) and plan[k + 1].kind == "iter":
            return y.detach()
        out = y.detach().requires_grad_(p.grad)
        if p.grad:
            mb.leaves[k] = out
        with self._record(("loss", mb.index)), autocast_context(self.dtype, self.ps.device):
            if p.kind == "iter":
                with torch.set_grad_enabled(True):
                    logits = self.model.decode(out)
                    mb.ce = self.objective.ce(logits, mb.batch["labels"].to(self.ps.device))
                if mb.probe is None:
                    return None
                mb.fd = self.objective.fd_iteration(mb.probe.select(out.detach()), mb.gen)
            else:
                mb.fd.take(out)
            return mb.fd.point()

    def _loss_backward(self, mb: _Micro) -> None:
        """Last stage, after the microbatch's last pass: the loss and its gradients for the passes'
        outputs (and the tied weight, summed over the step)."""
        mb.est = mb.fd.result() if mb.fd is not None else None
        mb.loss = self.objective.loss(mb.ce, mb.est)
        ks = sorted(mb.leaves)
        leaves = [mb.leaves[k] for k in ks] + ([self.weight] if self.weight is not None else [])
        got = self._grad([mb.loss * self.loss_scale], None, leaves)
        for k, g in zip(ks, got):
            if g is not None:
                mb.out_grads[k] = g
        if self.weight is not None and got[-1] is not None:
            self.weight.grad = got[-1] if self.weight.grad is None else self.weight.grad + got[-1]
        mb.leaves.clear()
        if self.meter is not None:
            self.meter.free(("loss", mb.index))

    # ------------------------------------------------------------------ backward of a pass

    def backward(self, task: Task) -> None:
        ps, mb, k = self.ps, self.mbs[task.micro], task.k
        y, leaf = mb.saved.pop(k)
        if not self.pipe.last:
            g = self.net.recv(ps.next_rank, ("g", mb.index, k))
        else:
            g = mb.out_grads.pop(k, None)
            if _linked(self.plan, k):
                got = self.net.recv(ps.pp_ranks[0], ("g", mb.index, k))
                g = got if g is None else g + got
            if g is None:
                g = torch.zeros_like(y)
        use_e = self.pipe.first and self.plan[k].kind == "iter"
        leaves = ([leaf] if leaf is not None else []) + ([mb.e_leaf] if use_e else [])
        got = self._grad([y], [g], leaves)
        if leaf is not None:
            gx = got[0] if got[0] is not None else torch.zeros_like(leaf)
            self.net.send(gx, ps.prev_rank if not self.pipe.first else ps.pp_ranks[-1])
        if use_e and got[-1] is not None:
            mb.e_grad = got[-1] if mb.e_grad is None else mb.e_grad + got[-1]
        if self.meter is not None:
            self.meter.free(("pass", mb.index, k))
        mb.backwards_left -= 1
        if mb.backwards_left == 0:
            self._finish(mb)

    def _finish(self, mb: _Micro) -> None:
        """The microbatch's last backward on this stage: the encoding's (stage 0), then let go."""
        if mb.e is not None and mb.e_grad is not None:
            self._grad([mb.e], [mb.e_grad], [])
        mb.e = mb.e_leaf = mb.e_grad = mb.e_probe = None
        if self.meter is not None:
            self.meter.free(("encode", mb.index))
