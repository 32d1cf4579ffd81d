"""What a training step does differently on each layout, behind one object the `Trainer` drives.

torchtitan's shape: `ParallelState` (its ParallelDims: tp × pp × dp, the groups) and a
`parallelize` that applies the parallelism to the plain model; one process is the trivial case
(every dimension 1, no process group, every collective skipped), not a second code path.

    Engine(cfg)                  process groups (state.init_parallel), the layout validated
    engine.parallelize(model)    tp > 1: megatron-core layers (tensor.py); pp > 1: this stage's
                                 part (pipeline.split_stage); then the device
    engine.build_optimizer()     engine.opt, the optimizer step: zero 0: AdamW + our DP all-reduce
                                 and global clipping; zero 1/2: DeepSpeed (data_parallel.py);
                                 engine.scheduler, its learning-rate schedule
    engine.forward_backward()    pp > 1: the loop pipeline; else `objective.forward_backward` per
                                 microbatch (both: the one microbatch objective, stars/objective.py)
    engine.optimizer_step()      average over dp, clip by the global norm, update, schedule
    engine.reduce_metrics()      the step's metrics, averaged over dp, the same on every rank
    engine.shard_writer/load_shards  this rank's pieces of the logical checkpoint (DCP, checkpoint/dcp.py):
                                 saved on one layout, loaded on any other (resharding)
    engine.full_state_dict()     the single-device state dict (collective; evaluation only)

Microbatches: each DP rank reads `batch_size / dp` rows per source batch and splits them into
`parallel.microbatches`; microbatch j of DP rank r in accumulation round a is global microbatch
a·dp·M + r·M + j, which seeds the STARS estimator and the random initial state. A run on dp ranks
with M microbatches therefore equals one process with dp·M microbatches.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from stars_scale.config import RunConfig, StarsConfig
from stars_scale.errors import UserError
from stars_scale import checkpoint as ckpt
from stars_scale.checkpoint import dcp
from stars_scale.model.fused import refuse_unfused_resume
from stars_scale.parallel.consolidate import full_state_dict
from stars_scale.parallel.data_parallel import build_data_parallel, deepspeed_pickled_globals, load_schedule
from stars_scale.parallel.pipeline import HeldBytes, LoopPipeline, split_stage
from stars_scale.parallel.state import init_parallel
from stars_scale.parallel.tensor import parallelize_tensor, vocab_parallel_ce
from stars_scale.stars.depth import Depth
from stars_scale.stars.objective import MicroResult, forward_backward


class Engine:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.ps = init_parallel(cfg)
        self.device = self.ps.device
        self.model = None
        self.core_offset = 0
        self.pipeline: LoopPipeline | None = None
        self.opt = None
        # measured activation memory (tests, benches): the most bytes autograd held for backward
        # at once in the last step (HeldBytes: unique storages, parameters excluded)
        self.measure = False
        self.peak_saved_bytes = 0
        # asynchronous checkpoints run their collectives on a group of their own, on a thread
        self.ckpt_group = dist.new_group(backend="gloo") if self.multi and cfg.train.async_save else None

    # ------------------------------------------------------------------ who does what

    @property
    def multi(self) -> bool:
        return self.ps.world > 1

    @property
    def is_logger(self) -> bool:
        """The one rank that logs metrics, talks to MLflow and reports (the last stage's first)."""
        return self.ps.is_logger

    @property
    def is_writer(self) -> bool:
        """The one rank that writes the run's shared files (config, consolidated model)."""
        return self.ps.rank == 0

    @property
    def tag(self) -> str:
        return f"{self.ps.layout}-zero{self.zero}"

    @property
    def zero(self) -> int:
        return self.cfg.parallel.zero if self.multi else 0

    def layout(self) -> dict:
        """What a checkpoint's shards depend on (resuming needs the same)."""
        return {"tp": self.ps.tp, "pp": self.ps.pp, "dp": self.ps.dp, "zero": self.zero,
                "microbatches": self.cfg.parallel.microbatches}

    def share(self, obj, src: int | None = None):
        """`obj` of rank `src` (default: the logger) on every rank."""
        if not self.multi:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.ps.logger_rank if src is None else src)
        return box[0]

    def on_writer(self, fn: Callable[[], None]) -> None:
        """Run `fn` on rank 0; its UserError is raised on every rank (one clear error, no hang)."""
        error = None
        if self.is_writer:
            try:
                fn()
            except UserError as e:
                error = str(e)
        error = self.share(error, src=0)
        if error is not None:
            raise UserError(error)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any."""
        if not self.multi:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.multi:
            dist.barrier()

    # ------------------------------------------------------------------ model, optimizer

    def parallelize(self, model):
        """The full single-device model (built the same way on every rank) -> this rank's part."""
        ps = self.ps
        if ps.tp > 1:
            parallelize_tensor(model.cpu(), ps.tp, ps.tp_rank)
        self.core_offset, _ = split_stage(model, ps.pp, ps.pp_rank)
        self.model = model.to(self.device)
        if ps.pp > 1:
            self.pipeline = LoopPipeline(self.model, ps, self.cfg.parallel.schedule)
        return self.model

    def build_optimizer(self) -> None:
        """The optimizer step for this layout (`self.opt`, its schedule `self.scheduler`)."""
        # the optimizer's backward calls per step: one per microbatch, or one per pipeline step
        # (under DeepSpeed the pipeline sums its passes' gradients and hands them over in one)
        backwards = self.cfg.train.grad_accum * (1 if self.pipeline is not None else self.cfg.parallel.microbatches)
        self.opt = build_data_parallel(self.model, self.cfg, self.ps, backwards, zero=self.zero)

    @property
    def scheduler(self):
        """The learning-rate schedule of the optimizer step."""
        return self.opt.scheduler

    @property
    def lr(self) -> float:
        return self.opt.lr

    # ------------------------------------------------------------------ one step

    def micro_id(self, accum: int, j: int) -> int:
        M = self.cfg.parallel.microbatches
        return accum * self.ps.dp * M + self.ps.dp_rank * M + j

    def check_depth(self, step: int, total: int) -> None:
        if not self.multi:
            return
        t = torch.tensor([total, -total], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != total or int(-t[1]) != total:
            raise RuntimeError(f"step {step}: ranks drew different depths ({int(-t[1])}..{int(t[0])})")

    def ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The token CE of this layout: vocab-parallel over the tp group, the model's kernels."""
        return vocab_parallel_ce(logits, labels, self.ps.tp, self.model.cfg.kernels, self.ps.tp_group)

    def forward_backward(self, batches: list[dict], micro_ids: list[int], depth: Depth, step: int,
                         stars: StarsConfig | None = None) -> list[MicroResult]:
        """`stars`: the objective's options this step (default: the config's; the Trainer passes
        the warm-up it resolved from `stars.warmup_ce`)."""
        cfg = self.cfg
        stars = cfg.stars if stars is None else stars
        common = dict(step=step, seed=cfg.seed, loss_scale=1.0 / len(batches), dtype=cfg.train.dtype, ce_fn=self.ce)
        if self.pipeline is not None:
            self.pipeline.measure = self.measure
            # zero 0: the passes' gradients go straight into .grad; DeepSpeed: one backward per step
            out = self.pipeline.forward_backward(batches, depth, stars, micro_ids=micro_ids,
                                                 backward=self.opt.backward if self.zero else None, **common)
            self.peak_saved_bytes = self.pipeline.stats.peak_saved_bytes
            return out
        out = []
        meter = HeldBytes(self.model) if self.measure else None
        for mb, mi in zip(batches, micro_ids):  # one microbatch in flight: its backward frees it
            with meter.recording(mi) if meter is not None else contextlib.nullcontext():
                out.append(forward_backward(self.model, mb, depth, stars, micro=mi, backward=self.opt.backward,
                                            **common))
            if meter is not None:
                meter.update_peak()
                meter.free(mi)
        self.peak_saved_bytes = meter.peak if meter is not None else 0
        return out

    def optimizer_step(self) -> float:
        """Average over dp, clip by the global norm, update, advance the schedule; the norm."""
        return self.opt.step()

    def scale_lr(self, factor: float) -> None:
        self.opt.scale_lr(factor)

    def reduce_metrics(self, results: list[MicroResult]) -> dict:
        """loss, ce, penalty, rho (means over the step's microbatches, all DP ranks) and tokens,
        from the last stage to every rank."""
        ps = self.ps
        vec = torch.zeros(6, dtype=torch.float64, device=self.device)
        if ps.is_last_stage:
            n = len(results)
            vec[0] = sum(r.loss for r in results) / n
            vec[1] = sum(r.ce for r in results) / n
            has = [r for r in results if r.rho is not None]
            if has:
                vec[2] = sum(r.penalty for r in has) / len(has)
                vec[3] = sum(r.rho for r in has) / len(has)
                vec[4] = 1.0
            vec[5] = sum(r.tokens for r in results)
            if ps.dp > 1:
                dist.all_reduce(vec, group=ps.dp_group)
                vec[:5] /= ps.dp
        if self.multi:
            dist.broadcast(vec, src=ps.logger_rank)
        has_rho = bool(vec[4] > 0.5)
        return {"loss": float(vec[0]), "ce": float(vec[1]), "penalty": float(vec[2]) if has_rho else None,
                "rho": float(vec[3]) if has_rho else None, "tokens": int(vec[5])}

    # ------------------------------------------------------------------ checkpoint shards

    def rank_file(self, d: Path) -> Path:
        return d / f"rank_{self.ps.rank:05d}.pt"

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device state dict (collective: every rank calls it)."""
        if not self.multi:
            return self.model.state_dict()
        return full_state_dict(self.model, self.ps, self.core_offset, self.cfg.model)

    def checkpoint_state(self, loading: bool) -> dict[str, dcp.Logical]:
        """This rank's pieces of the logical (single-device) model and optimizer state."""
        ps = self.ps
        specs = dcp.param_specs(self.model, self.cfg.model, ps.tp, ps.tp_rank, self.core_offset)
        state = self.opt.logical_state(specs, loading)
        for name, t, spec in specs:
            state.setdefault(f"model/{name}", dcp.Logical(spec.shape, t.dtype).add_local(t.detach(), spec))
        return state

    def shard_writer(self, extra: dict, copy: bool = False) -> Callable[[Path], None]:
        """The function that writes this rank's part of a checkpoint (collective): its own pieces
        of the logical state through DCP (no rank gathers the model), its RNG and data position
        into ranks/rank_N.json. `copy`: copy them now, and write over the checkpoint group, for
        an asynchronous save (training goes on while a thread writes)."""
        state = self.checkpoint_state(loading=False)
        if copy:
            state = {k: v.copy() for k, v in state.items()}
        ps = self.ps
        text = ckpt.rank_state_text(ps.rank, ps.dp_rank, self.layout(), extra["rng"], extra["data"])
        group = self.ckpt_group if copy else None

        def write(tmp: Path) -> None:
            dcp.save(state, tmp / dcp.DCP_DIR, group)
            ckpt.write_rank_state(tmp, ps.rank, text)

        return write

    def checkpoint_barrier(self) -> None:
        """The barrier of an asynchronous save (its own group: the training thread's collectives
        go on meanwhile)."""
        if self.multi:
            dist.barrier(group=self.ckpt_group)

    def load_shards(self, path: Path, scheduler_state: dict | None = None) -> dict:
        """This rank's pieces of checkpoint `path` (saved on any layout) into the model and the
        optimizer; returns its extras (rng, data) from the saved rank of the same data-parallel
        rank (or rank 0's). Checkpoints of the per-rank format load on their own layout only."""
        if not (path / dcp.DCP_DIR).is_dir():
            return self._load_rank_files(path)
        dcp.load(self.checkpoint_state(loading=True), path / dcp.DCP_DIR)
        self.opt.after_load()
        if scheduler_state is None:
            raise UserError(f"{path / ckpt.STATE_FILE}: no 'scheduler' state")
        load_schedule(self.opt.scheduler, scheduler_state, str(path / ckpt.STATE_FILE))
        return ckpt.read_rank_state(path, self.ps.rank, self.ps.dp_rank)

    def _load_rank_files(self, path: Path) -> dict:
        """A checkpoint of the per-rank format (before DCP): same layout only (checked by the trainer)."""
        f = self.rank_file(path)
        if not f.is_file():
            raise UserError(f"{path}: no {f.name} (the checkpoint was written by another layout or is incomplete)")
        mine = ckpt.load_tensor_file(f)
        model_sd = mine["model"] if self.multi else ckpt.load_tensor_file(path / "model.pt")
        refuse_unfused_resume(model_sd, path)
        self.model.load_state_dict(model_sd)
        if self.zero == 0:
            self.opt.load_state_dict(mine["engine"])
        else:
            ckpt.check_tensor_files(path / "deepspeed", deepspeed_pickled_globals())
            self.opt.load(path / "deepspeed", tag="state")
        return mine

