"""The training loop: depth sampling, the STARS objective ((1−λ)·CE + λ·P by default,
`stars.combine`; stars/objective.py), AdamW, checkpoints, tracking, evaluation.

One Trainer for every layout: what differs by layout (process groups, the model's parallel
form, the forward-backward of a step, the optimizer/ZeRO step, checkpoint shards) is the
`stars_scale.parallel.engine.Engine` it drives; one process is the engine's trivial case.

Checkpoints: `dcp/` (torch.distributed.checkpoint: every rank writes its pieces of the
single-device model and optimizer state under their logical names, so a checkpoint resumes on
any layout and `stars-eval` reads it in one process), `ranks/rank_00003.json` per rank (RNG,
data position), `trainer_state.json` (step, schedule, layout) and `config.yaml`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from stars_scale import checkpoint as ckpt
from stars_scale.config import RunConfig, config_text, load_config, save_config
from stars_scale.data.sources import build_eval_batch, build_train_source
from stars_scale.errors import UserError
from stars_scale.eval.depth_scaling import depth_sweep, write_depth_scaling
from stars_scale.model.looped import LoopedLM
from stars_scale.parallel.compile import apply_compile
from stars_scale.parallel.engine import Engine
from stars_scale.stars.depth import DepthSampler, median_depth
from stars_scale.stars.objective import PenaltyGate
from stars_scale.tracking.mlflow_tracker import MlflowTracker, NodeSystemMetrics, default_tracking_uri
from stars_scale.tracking.start import start_tracker
from stars_scale.train.host_malloc import keep_freed_memory
from stars_scale.train.nonfinite import NonFiniteGuard
from stars_scale.utils import flatten_dict


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except Exception:
        return None


def split_microbatches(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """`n` equal microbatches of consecutive rows (the batch's rows must divide by n)."""
    rows = batch["input_ids"].shape[0]
    if rows % n:
        raise ValueError(f"a batch of {rows} rows does not split into {n} microbatches")
    return [{k: v[i * rows // n:(i + 1) * rows // n] for k, v in batch.items()} for i in range(n)]


class PreemptionFlag:
    """SIGUSR1 / SIGTERM set a flag; the loop finishes its step, checkpoints and stops. `raised`
    is the flag agreed by every rank at the end of a step (a signal seen by any rank stops all)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.raised = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir: str | Path, resume: str | bool | None = None,
                 stop_after_steps: int | None = None, allow_config_change: bool = False):
        self.out = Path(out_dir)
        self.allow_config_change = allow_config_change
        self.stop_after_steps = stop_after_steps
        self.engine = engine = Engine(cfg)  # validates the layout before any process blocks
        self.device = engine.device
        if not engine.is_logger:  # one progress bar
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
        self.cfg = cfg
        if self.device.type == "cpu" and cfg.train.host_malloc == "tuned":
            keep_freed_memory()
        self.resume_from = self._resolve_resume(resume)
        engine.on_writer(self._prepare_out_dir)
        torch.manual_seed(cfg.seed)
        self.model = engine.parallelize(self._build_model())  # the full model from the seed, then this rank's part
        self.source = build_train_source(cfg, engine.ps.dp_rank, engine.ps.dp)
        self.sampler = DepthSampler(cfg.depth, cfg.seed)
        engine.build_optimizer()
        self.step = 0
        self.tokens_seen = 0
        self.run_id: str | None = None
        self.depth_history: list[int] = []
        self.gate = PenaltyGate(cfg.stars)  # when the penalty enters the loss (stars.warmup_ce)
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.tracker: MlflowTracker | None = None
        self.system_metrics: NodeSystemMetrics | None = None
        self.preempt = PreemptionFlag()
        self.pending = ckpt.AsyncSave()
        self.metrics_log = ckpt.MetricsLog(self.out / "metrics.jsonl")
        self._eval_batch: tuple[dict[str, torch.Tensor], bool] | None = None

    @property
    def reports(self) -> bool:
        """Whether this process reports (logs, prints the summary): the logger rank."""
        return self.engine.is_logger

    # ------------------------------------------------------------------ setup

    def _build_model(self) -> LoopedLM:
        """The full single-device model: from the seed, or from converted weights (init.from)."""
        model = LoopedLM(self.cfg.model)
        model.checkpointing = self.cfg.train.checkpointing
        apply_compile(model, self.cfg.train.compile)
        if self.resume_from is None and self.cfg.init.from_:
            self._init_from_converted(model, self.cfg.init.from_)
        return model

    def run_identity(self) -> dict[str, str | None]:
        """What makes a checkpoint "this run's" for an automatic restart: the torchrun job
        (TORCHELASTIC_RUN_ID, kept across its restarts) and the hash of the run's config."""
        d = self.cfg.to_dict()
        d["train"].pop("progress", None)  # differs by rank, changes nothing
        d.pop("tracking", None)
        digest = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {"launch_id": os.environ.get("TORCHELASTIC_RUN_ID"), "config_hash": digest}

    def _resolve_resume(self, resume: str | bool | None) -> Path | None:
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if not resume and restart > 0:
            return self._restart_checkpoint(restart)
        if not resume:
            return None
        if resume == "auto":  # a requeued job: continue if a checkpoint exists, else start fresh
            found = ckpt.latest_checkpoint(self.out)
        elif resume is True:
            found = ckpt.latest_checkpoint(self.out)
            if found is None:
                raise UserError(f"--resume: no complete checkpoint in {self.out / 'checkpoints'} to resume from")
        else:
            found = ckpt.resolve_checkpoint(resume)
        if found is not None:
            self._check_same_run(found)
        return found

    def _check_same_run(self, path: Path) -> None:
        """A resume continues the run of the checkpoint: refuse one whose seed, model, depth, stars,
        data or optim differ from this config (ckpt.RUN_IDENTITY) unless --allow-config-change."""
        cfg_path = path / ckpt.RUN_CONFIG
        if self.allow_config_change or not cfg_path.is_file():
            return
        changes = ckpt.identity_changes(load_config(cfg_path).to_dict(), self.cfg.to_dict())
        if changes:
            shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
            raise UserError(f"{path}: --resume of another run ({shown}); choose another --out, or pass "
                            "--allow-config-change to continue it with this config")

    def _restart_checkpoint(self, restart: int) -> Path | None:
        """torchrun restarted this job (a worker died): continue from the newest verified
        checkpoint of the same run without --resume; a directory of another run is refused."""
        latest = ckpt.latest_checkpoint(self.out)
        if latest is None:
            return None  # died before its first checkpoint: start afresh
        saved = ckpt.load_state(latest).get("run")
        if saved != self.run_identity():
            raise UserError(f"{latest}: torchrun restart {restart} found a checkpoint of another run (saved as "
                            f"{saved}, this run is {self.run_identity()}); pass --resume to continue it or "
                            "choose another --out")
        if self.engine.is_writer:
            print(f"torchrun restart {restart}: resuming from {latest}", file=sys.stderr)
        return latest

    def _prepare_out_dir(self) -> None:
        if self.resume_from is None and ckpt.list_checkpoints(self.out):
            raise UserError(f"{self.out}: already holds checkpoints; pass --resume to continue that run "
                            "or choose another --out (nothing is overwritten)")
        ckpt.open_run_dir(self.out)
        ckpt.write_run_config(self.out, config_text(self.cfg))  # before anything else is written there
        ckpt.clean_stale(self.out)
        if self.resume_from is None:
            ckpt.set_aside_stale_metrics(self.out / "metrics.jsonl")

    def _load(self, path: Path, keep_metrics: bool = False) -> None:
        state = ckpt.load_state(path)
        saved_cfg = load_config(path / "config.yaml") if (path / "config.yaml").is_file() else None
        if saved_cfg is not None and saved_cfg.model != self.cfg.model:
            raise UserError(f"{path}: the checkpoint's model config differs from this run's model config")
        legacy = not (path / "dcp").is_dir()  # per-rank files: only the layout that wrote them
        if legacy and state.get("layout") != self.engine.layout():
            raise UserError(f"{path}: written with layout {state.get('layout')} in the per-rank format of older "
                            f"versions, this run is {self.engine.layout()}; resume it on the same "
                            "parallel.tp/pp/zero/microbatches and number of processes")
        mine = self.engine.load_shards(path, state.get("scheduler"))
        torch.set_rng_state(mine["rng"])
        self.source.load_state_dict(mine["data"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.gate.load_state_dict(state.get("penalty_gate", {}))
        self.run_id = state.get("mlflow_run_id")
        if not keep_metrics:
            self._truncate_metrics(self.step)

    def _init_from_converted(self, model: LoopedLM, path: str) -> None:
        """Continued pretraining: weights from `stars-convert import` output (optimizer starts fresh)."""
        from stars_scale.convert import load_converted

        model_cfg, state = load_converted(path)
        if self.cfg.init.strict and model_cfg != self.cfg.model:
            diffs = [f"model.{k}: run has {getattr(self.cfg.model, k)!r}, {path} has {getattr(model_cfg, k)!r}"
                     for k in vars(model_cfg) if getattr(model_cfg, k) != getattr(self.cfg.model, k)]
            raise UserError(f"init.from {path}: the converted model differs from this run's model config "
                            f"({'; '.join(diffs)}); fix the config or set init.strict: false")
        missing, unexpected = model.load_state_dict(state, strict=self.cfg.init.strict)
        if missing or unexpected:
            print(f"init.from {path}: {len(missing)} missing and {len(unexpected)} unexpected tensors "
                  "(init.strict: false)", file=sys.stderr)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after the checkpoint we resume from (they will be logged again)."""
        if self.reports:
            ckpt.truncate_metrics(self.out / "metrics.jsonl", step)

    def _start_system_metrics(self) -> None:
        """One sampler per node (local rank 0), into the run every rank knows by now."""
        t = self.cfg.tracking
        if not (t.mlflow and t.system_metrics and self.run_id) or int(os.environ.get("LOCAL_RANK", "0")) != 0:
            return
        import socket

        node = os.environ.get("SLURM_NODEID") or socket.gethostname()
        self.system_metrics = NodeSystemMetrics(self.run_id, default_tracking_uri(t.tracking_uri),
                                                node_id=f"node{node}" if node.isdigit() else node,
                                                interval=t.system_metrics_interval)

    def _start_tracking(self) -> None:
        if self.reports:
            self._open_tracker()
        self.run_id = self.engine.share(self.run_id)

    def _open_tracker(self) -> None:
        t = self.cfg.tracking
        if not t.mlflow:
            return
        tags = {"stars.git_commit": git_commit() or "unknown",
                "stars.layout": self.engine.tag,
                "stars.out_dir": str(self.out.resolve())}
        if os.environ.get("SLURM_JOB_ID"):
            tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
        fresh = self.run_id is None
        self.tracker = start_tracker(t, self.out / "metrics.jsonl", run_name=t.run_name or self.out.name,
                                     run_id=self.run_id, tags=tags,
                                     parent_run_id=os.environ.get("STARS_MLFLOW_PARENT_RUN_ID"))
        if self.tracker is None:  # said once why (or refused under tracking.required: true)
            return
        self.run_id = self.tracker.run_id
        if fresh:
            self.tracker.log_params(flatten_dict(self.cfg.to_dict()))
            self.tracker.log_artifact(self.out / ckpt.RUN_CONFIG)

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        return self._staged_save(copy=False)()

    def _staged_save(self, copy: bool):
        """The save of the checkpoint of this step, as a function; `copy`: the state is copied now
        and the function may run on another thread (train.async_save) while training goes on."""
        engine, cfg, out, step = self.engine, self.cfg, self.out, self.step
        shards = engine.shard_writer({"rng": torch.get_rng_state(), "data": self.source.state_dict()}, copy=copy)

        def write(tmp: Path) -> None:
            shards(tmp)
            if engine.is_writer:
                save_config(cfg, tmp / "config.yaml")

        state = json.loads(json.dumps({  # a copy: the schedule moves on
            "step": step, "tokens_seen": self.tokens_seen, "scheduler": engine.scheduler.state_dict(),
            "penalty_gate": self.gate.state_dict(),
            "data": self.source.state_dict(), "mlflow_run_id": self.run_id, "layout": engine.layout(),
            "run": self.run_identity(), "time": time.time()}))
        barrier = engine.checkpoint_barrier if copy else engine.barrier
        return lambda: ckpt.save_checkpoint(out, step, write, state, cfg.train.keep_last, is_writer=engine.is_writer,
                                            barrier=barrier, group=engine.ckpt_group if copy else None)

    def _save_periodic(self) -> Path | None:
        """A periodic checkpoint: written now, or (train.async_save) on a background thread after
        the previous one finished; a failure of that previous save is reported here."""
        if not self.cfg.train.async_save:
            return self.save()
        failed = self._wait_for_save()
        self.pending.start(self._staged_save(copy=True))
        if failed is not None:
            raise failed
        return None

    def _wait_for_save(self) -> ckpt.CheckpointSaveError | None:
        try:
            self.pending.wait()
        except ckpt.CheckpointSaveError as e:
            return e
        return None

    def _wait_for_save_or_raise(self) -> None:
        failed = self._wait_for_save()
        if failed is not None:
            raise failed

    # ------------------------------------------------------------------ loop

    def train_step(self) -> dict[str, float]:
        cfg, engine = self.cfg, self.engine
        depth = self.sampler.sample(self.step)
        engine.check_depth(self.step, depth.total)
        self.depth_history.append(depth.total)
        t0 = time.perf_counter()
        self.model.train()
        # train.grad_accum batches per step, each split into parallel.microbatches microbatches
        # (the unit the STARS estimator works on)
        batches, micro_ids = [], []
        for a in range(cfg.train.grad_accum):
            for j, mb in enumerate(split_microbatches(self.source.next_batch(), cfg.parallel.microbatches)):
                batches.append(mb)
                micro_ids.append(engine.micro_id(a, j))
        results = engine.forward_backward(batches, micro_ids, depth, self.step, self.gate.config())
        lr = engine.lr
        grad_norm = engine.optimizer_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        m = engine.reduce_metrics(results)
        self.preempt.raised = engine.any_rank(self.preempt.signum is not None)
        dt = time.perf_counter() - t0
        self.step += 1
        self.tokens_seen += m["tokens"]
        self._open_gate(m["ce"])
        return {
            "step": self.step, "loss": m["loss"], "ce": m["ce"], "penalty": m["penalty"], "rho": m["rho"],
            "depth": depth.total, "n_grad": depth.n_grad, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": m["tokens"] / dt, "tokens": self.tokens_seen, "step_time": dt,
        }

    def _open_gate(self, ce: float) -> None:
        """`stars.warmup_ce`: the step's CE decides whether the penalty enters from the next step."""
        if self.gate.update(self.step, ce) and self.engine.is_writer:
            print(f"step {self.step}: the STARS penalty enters the loss (mean training CE of the last "
                  f"{PenaltyGate.WINDOW} steps <= stars.warmup_ce = {self.cfg.stars.warmup_ce:g})", file=sys.stderr)

    # ------------------------------------------------------------------ evaluation

    def full_model(self) -> LoopedLM | None:
        """The single-device model on the reporting rank (None elsewhere); collective."""
        if not self.engine.multi:
            return self.model
        full = self.engine.full_state_dict()
        if not self.reports:
            return None
        model = LoopedLM(self.cfg.model)
        model.load_state_dict(full)
        return model.to(self.device).eval()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        model = self.full_model()
        if model is None:
            return {}
        batch, has_acc = self.eval_batch()
        res = depth_sweep(model, batch, [median_depth(self.cfg.depth)], rho_iters=1, rho_samples=1,
                          batch_size=self.cfg.eval.batch_size, seed=self.cfg.seed, has_accuracy=has_acc)
        out = {"val_loss": res["loss"][0]}
        if has_acc:
            out["val_acc"] = res["accuracy"][0]
        return out

    def eval_batch(self) -> tuple[dict[str, torch.Tensor], bool]:
        if self._eval_batch is None:
            self._eval_batch = build_eval_batch(self.cfg, self.cfg.eval.samples)
        return self._eval_batch

    def _log(self, metrics: dict[str, Any]) -> None:
        if not self.reports:
            return
        self.metrics_log.append(metrics)  # a full disk warns once; training goes on
        if self.tracker is not None:
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def evaluate_depths(self) -> dict | None:
        e = self.cfg.eval
        if not e.depths:
            return None
        model = self.full_model()
        if model is None:
            return None
        batch, has_acc = self.eval_batch()
        results = depth_sweep(model, batch, e.depths, rho_iters=e.rho_iters, batch_size=e.batch_size,
                              seed=self.cfg.seed, has_accuracy=has_acc)
        results["step"] = self.step
        jpath, ppath = write_depth_scaling(results, self.out, title=f"{self.out.name} @ step {self.step}")
        if self.tracker is not None:
            for i, d in enumerate(results["depths"]):
                m = {"eval_loss": results["loss"][i], "eval_rho": results["rho"][i],
                     "eval_delta_h": results["delta_h"][i]}
                if results["accuracy"] is not None:
                    m["eval_accuracy"] = results["accuracy"][i]
                self.tracker.log_metrics(m, step=d)
            self.tracker.log_artifact(jpath)
            self.tracker.log_artifact(ppath)
        return results

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self._start_tracking()
        self._start_system_metrics()
        self.preempt.install()
        status = "FAILED"
        last: dict[str, Any] = {}
        bar = None
        try:
            if self.step >= cfg.train.steps:  # resumed a run that already finished: nothing to do
                status = "FINISHED"
                print(f"{self.out}: already trained to step {self.step} of {cfg.train.steps}", file=sys.stderr)
                return {"step": self.step, "stopped_early": False, "already_complete": True}
            if cfg.train.progress and self.step < cfg.train.steps:
                from tqdm import tqdm

                bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", dynamic_ncols=True,
                           file=sys.stderr, mininterval=1.0)
            steps_this_run = 0
            stopped_early = False
            save = ckpt.SaveRetry(cfg.train.max_failed_saves)
            guard = NonFiniteGuard(cfg.train.nonfinite, cfg.train.max_skips)
            while self.step < cfg.train.steps:
                last = self.train_step()
                steps_this_run += 1
                action = guard.after_step(self.step, last["loss"], last["grad_norm"])
                last["skipped_steps"] = guard.skipped
                if action == "rollback":
                    self._rollback(last)
                    continue
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                    last.update(self.validate())
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    self._log(last)
                if bar is not None:
                    post = {"loss": f"{last['loss']:.3f}", "r": last["depth"], "tok/s": f"{last['tokens_per_s']:.0f}"}
                    if last["rho"] is not None:
                        post["rho"] = f"{last['rho']:.3f}"
                    if "val_acc" in last:
                        post["acc"] = f"{last['val_acc']:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0 and self.step < cfg.train.steps:
                    save(self._save_periodic)
                if self.preempt.raised or (self.stop_after_steps and steps_this_run >= self.stop_after_steps):
                    stopped_early = self.step < cfg.train.steps
                    break
            if bar is not None:
                bar.close()
                bar = None
            save(self._wait_for_save_or_raise)
            save(self.save, final=True)
            if stopped_early:
                status = "KILLED" if self.preempt.raised else "FINISHED"
                if self.preempt.raised:
                    self._requeue()
                return {"step": self.step, "stopped_early": True, **last}
            results = self.evaluate_depths()
            status = "FINISHED"
            return {"step": self.step, "stopped_early": False, "depth_scaling": results, **last}
        finally:
            self._wait_for_save()  # never exit with a save in flight
            if bar is not None:
                bar.close()
            if self.system_metrics is not None:
                self.system_metrics.close()
            if self.tracker is not None:
                # a preempted run stays RUNNING in MLflow: the requeued job continues it
                self.tracker.close(status="RUNNING" if self.preempt.raised else status)
            self.preempt.restore()  # only now: a second TERM must not cut the flush short

    def _rollback(self, last: dict[str, Any]) -> None:
        """Back to the newest verified checkpoint with the learning rate scaled (train/nonfinite.py)."""
        failed = self._wait_for_save()  # the newest checkpoint may be the one in flight
        if failed is not None and self.reports:
            print(f"warning: {failed}", file=sys.stderr)
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            raise UserError(f"step {self.step}: non-finite steps and no checkpoint in {self.out / 'checkpoints'} "
                            "to roll back to (set train.ckpt_every)")
        self._log(last)  # the step that triggered it stays on record
        scale = self.cfg.train.rollback_lr_scale
        if self.reports:
            print(f"step {self.step}: {self.cfg.train.max_skips + 1} non-finite steps in a row; rolling back to "
                  f"{path.name} with the learning rate scaled by {scale}", file=sys.stderr)
        self._load(path, keep_metrics=True)
        self.engine.scale_lr(scale)

    def _requeue(self) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        name = signal.Signals(self.preempt.signum).name if self.preempt.signum else "a peer rank's signal"
        if not job:
            print(f"stopped by {name} at step {self.step}; checkpoint saved, resume with --resume", file=sys.stderr)
            return
        if not self.engine.is_writer:
            return
        if os.environ.get("STARS_LAUNCHER_REQUEUES") == "1":  # launch/sbatch.template requeues after we exit
            print(f"stopped by {name} at step {self.step}; checkpoint saved; the batch script requeues job {job}",
                  file=sys.stderr)
            return
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        msg = "requeued" if res.returncode == 0 else f"requeue failed: {res.stderr.strip()}"
        print(f"stopped by {name} at step {self.step}; checkpoint saved; job {job} {msg}", file=sys.stderr)
