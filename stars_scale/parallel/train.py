"""The trainer on many processes: the same loop as `Trainer`, parallel pieces plugged in.

    state.init_parallel          process groups (megatron-core), validated layout
    LoopedLM(cfg) from the seed  the full single-device model, on every rank
    tensor.parallelize_tensor    tp > 1: megatron-core layers, weights sliced from the full model
    pipeline.split_stage         pp > 1: keep this stage's core blocks (and ends)
    data_parallel.build_engine   zero 0: own all-reduce; zero 1/2: DeepSpeed
    pipeline.LoopPipeline        pp > 1: the ring schedule; pp = 1: `step.forward_backward`

Microbatches: each DP rank reads `batch_size / dp` rows per source batch and splits them into
`parallel.microbatches`; microbatch j of DP rank r is global microbatch r·M + j, which seeds the
STARS estimator and the random initial state. A run on dp ranks with M microbatches therefore
equals one process with dp·M microbatches (same rows, same directions, same mean).

Metrics are reduced over the DP group on the last stage and broadcast from the logger (the last
stage's first rank), which alone writes metrics.jsonl and talks to MLflow. Checkpoints: one file
per rank (`rank_00003.pt` for rank 3: its shard of the model, optimizer or DeepSpeed state, RNG, data
position), plus a consolidated single-device `model.pt` so that `stars-eval` reads it as is;
resuming needs the same layout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from stars_scale.config import RunConfig, load_config, save_config
from stars_scale.data.sources import build_train_source
from stars_scale.errors import UserError
from stars_scale.model.looped import LoopedLM
from stars_scale.parallel.consolidate import full_state_dict
from stars_scale.parallel.data_parallel import build_engine
from stars_scale.parallel.pipeline import LoopPipeline, split_stage
from stars_scale.parallel.state import init_parallel
from stars_scale.parallel.tensor import parallelize_tensor, vocab_parallel_ce
from stars_scale.train import checkpoint as ckpt
from stars_scale.train.step import forward_backward, split_microbatches
from stars_scale.train.trainer import PreemptionFlag, Trainer


class SyncedPreemption(PreemptionFlag):
    """A signal seen by any rank stops every rank after the same step."""

    def __init__(self) -> None:
        super().__init__()
        self.synced = False

    def sync(self, device) -> None:
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.synced = bool(flag.item() > 0)

    @property
    def raised(self) -> bool:
        return self.synced


class ParallelTrainer(Trainer):
    def __init__(self, cfg: RunConfig, out_dir: str | Path, resume: str | bool | None = None,
                 stop_after_steps: int | None = None):
        self.depth_history: list[int] = []
        super().__init__(cfg, out_dir, resume=resume, stop_after_steps=stop_after_steps)

    # ------------------------------------------------------------------ setup hooks

    def _setup_processes(self) -> None:
        self.ps = ps = init_parallel(self.cfg)
        self.device = ps.device
        if not ps.is_logger:  # one progress bar
            self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, progress=False))

    def _prepare_out_dir(self) -> None:
        error = None
        if self.ps.rank == 0:
            try:
                super()._prepare_out_dir()
            except UserError as e:
                error = str(e)
        box = [error]
        dist.broadcast_object_list(box, src=0)  # every rank stops with the same clear error
        if box[0] is not None:
            raise UserError(box[0])

    def _build_model(self):
        model = super()._build_model().cpu()  # the full model from the seed (or init.from), as on one process
        if self.ps.tp > 1:
            parallelize_tensor(model, self.ps.tp, self.ps.tp_rank)
        self.core_offset, _ = split_stage(model, self.ps.pp, self.ps.pp_rank)
        return model.to(self.device)

    def _build_source(self):
        return build_train_source(self.cfg, self.ps.dp_rank, self.ps.dp)

    def _build_optimizer(self) -> None:
        n_micro = self.cfg.train.grad_accum * self.cfg.parallel.microbatches
        self.engine = build_engine(self.model, self.cfg, self.ps, 1 if self.ps.pp > 1 else n_micro)
        self.scheduler = self.engine.scheduler
        self.pipeline = LoopPipeline(self.model, self.ps) if self.ps.pp > 1 else None

    def _make_preemption(self) -> SyncedPreemption:
        return SyncedPreemption()

    # ------------------------------------------------------------------ tracking / logging

    def _start_tracking(self) -> None:
        if self.ps.is_logger:
            super()._start_tracking()
        run_id = [self.run_id]
        dist.broadcast_object_list(run_id, src=self.ps.logger_rank)
        self.run_id = run_id[0]

    def _layout_tag(self) -> str:
        return f"{self.ps.layout}-zero{self.cfg.parallel.zero}"

    def _log(self, metrics: dict[str, Any]) -> None:
        if self.ps.is_logger:
            super()._log(metrics)

    def _truncate_metrics(self, step: int) -> None:
        if self.ps.is_logger:
            super()._truncate_metrics(step)

    # ------------------------------------------------------------------ checkpoints

    def _rank_file(self, d: Path) -> Path:
        return d / f"rank_{self.ps.rank:05d}.pt"

    def save(self) -> Path:
        full = full_state_dict(self.model, self.ps, self.core_offset, self.cfg.model)
        zero = self.cfg.parallel.zero

        def write(tmp: Path) -> None:
            state = {"model": self.model.state_dict(), "rng": torch.get_rng_state(),
                     "data": self.source.state_dict(), "layout": self._layout()}
            if zero == 0:
                state["engine"] = self.engine.state_dict()
            ckpt.save_tensor_file(state, self._rank_file(tmp))
            if zero:
                self.engine.save(tmp / "deepspeed", tag="state")
            if self.ps.rank == 0:
                ckpt.save_tensor_file(full, tmp / "model.pt")
                save_config(self.cfg, tmp / "config.yaml")

        state = {"step": self.step, "tokens_seen": self.tokens_seen, "scheduler": self.engine.scheduler.state_dict(),
                 "data": self.source.state_dict(), "mlflow_run_id": self.run_id, "layout": self._layout(),
                 "time": time.time()}
        return ckpt.save_checkpoint(self.out, self.step, write, state, self.cfg.train.keep_last,
                                    is_writer=self.ps.rank == 0, barrier=dist.barrier)

    def _layout(self) -> dict:
        return {"tp": self.ps.tp, "pp": self.ps.pp, "dp": self.ps.dp, "zero": self.cfg.parallel.zero,
                "microbatches": self.cfg.parallel.microbatches}

    def _load(self, path: Path) -> None:
        state = ckpt.load_state(path)
        saved_cfg = load_config(path / "config.yaml") if (path / "config.yaml").is_file() else None
        if saved_cfg is not None and saved_cfg.model != self.cfg.model:
            raise UserError(f"{path}: the checkpoint's model config differs from this run's model config")
        if state.get("layout") != self._layout():
            raise UserError(f"{path}: written with layout {state.get('layout')}, this run is {self._layout()}; "
                            "resume on the same parallel.tp/pp/zero/microbatches and number of processes")
        mine = ckpt.load_tensor_file(self._rank_file(path))
        self.model.load_state_dict(mine["model"])
        if self.cfg.parallel.zero == 0:
            self.engine.load_state_dict(mine["engine"])
        else:
            self.engine.load(path / "deepspeed", tag="state")
            self.engine.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(mine["rng"])
        self.source.load_state_dict(mine["data"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.run_id = state.get("mlflow_run_id")
        self._truncate_metrics(self.step)

    # ------------------------------------------------------------------ one step

    def _check_depth(self, total: int) -> None:
        t = torch.tensor([total, -total], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != total or int(-t[1]) != total:
            raise RuntimeError(f"step {self.step}: ranks drew different depths ({int(-t[1])}..{int(t[0])})")

    def train_step(self) -> dict[str, float]:
        cfg, ps = self.cfg, self.ps
        depth = self.sampler.sample(self.step)
        self._check_depth(depth.total)
        self.depth_history.append(depth.total)
        t0 = time.perf_counter()
        self.model.train()
        M = cfg.parallel.microbatches
        batches, micro_ids = [], []
        for a in range(cfg.train.grad_accum):
            for j, mb in enumerate(split_microbatches(self.source.next_batch(), M)):
                batches.append(mb)
                micro_ids.append(a * ps.dp * M + ps.dp_rank * M + j)
        scale = 1.0 / len(batches)
        common = dict(step=self.step, seed=cfg.seed, loss_scale=scale, dtype=cfg.train.dtype)
        if self.pipeline is not None:
            results = self.pipeline.forward_backward(batches, depth, cfg.stars, micro_ids=micro_ids,
                                                     backward=self.engine.backward, **common)
        else:
            ce_fn = (lambda logits, labels: vocab_parallel_ce(logits, labels, ps.tp))
            results = [forward_backward(self.model, mb, depth, cfg.stars, micro=mi, ce_fn=ce_fn,
                                        backward=self.engine.backward, **common)
                       for mb, mi in zip(batches, micro_ids)]
        lr = self.engine.lr
        grad_norm = self.engine.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        # loss, ce, penalty, rho, tokens: averaged (summed) over DP on the last stage, then shared
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
        dist.broadcast(vec, src=ps.logger_rank)
        self.preempt.sync(self.device)
        dt = time.perf_counter() - t0
        self.step += 1
        tokens = int(vec[5])
        self.tokens_seen += tokens
        has_rho = vec[4] > 0.5
        return {
            "step": self.step, "loss": float(vec[0]), "ce": float(vec[1]),
            "penalty": float(vec[2]) if has_rho else None, "rho": float(vec[3]) if has_rho else None,
            "depth": depth.total, "n_grad": depth.n_grad, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens / dt, "tokens": self.tokens_seen, "step_time": dt,
        }

    # ------------------------------------------------------------------ evaluation

    def full_model(self) -> LoopedLM | None:
        """The consolidated single-device model on the logger rank (None elsewhere); collective."""
        full = full_state_dict(self.model, self.ps, self.core_offset, self.cfg.model)
        if not self.ps.is_logger:
            return None
        model = LoopedLM(self.cfg.model)
        model.load_state_dict(full)
        return model.to(self.device).eval()

    @contextlib.contextmanager
    def _consolidated(self):
        """The base class's evaluation on the consolidated model (logger rank only)."""
        model = self.full_model()
        plain, self.model = self.model, model
        try:
            yield model
        finally:
            self.model = plain

    def validate(self) -> dict[str, float]:
        with self._consolidated() as model:
            return super().validate() if model is not None else {}

    def evaluate_depths(self) -> dict | None:
        if not self.cfg.eval.depths:
            return None
        with self._consolidated() as model:
            return super().evaluate_depths() if model is not None else None
