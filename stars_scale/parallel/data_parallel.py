"""Data parallelism and the optimizer step: plain DP (zero 0) or DeepSpeed ZeRO stage 1 / 2.

Both expose the same calls to `engine.Engine`, which holds the one it built as `Engine.opt`
(DeepSpeed's own engine is `ZeroDataParallel.engine`):

    opt.backward(root)   once per backward the schedule makes (pp = 1: per microbatch;
                         pp > 1: once per step, see `pipeline`); `root` is already scaled
    opt.step() -> norm   average the gradients over the data-parallel group, clip them by
                         the true global norm, update, advance the learning-rate schedule
    opt.state_dict() / load_state_dict()   this rank's optimizer (and schedule) state
    opt.logical_state(specs, loading)      the optimizer state (and, under ZeRO, the fp32
                         master weights) as pieces of logical tensors (checkpoint/dcp.py)
    opt.after_load()     what a DCP load leaves to do (ZeRO: master weights from the model)

The global gradient norm counts every parameter once: tensor-parallel shards (megatron's
`tensor_model_parallel` attribute) on every tensor rank, replicated parameters (norms, biases
after a row-parallel layer) on tensor rank 0 only, summed over the model-parallel group
(tp × pp). DeepSpeed does the same given `DeepSpeedMPU` (it reads `get_tensor_model_parallel_rank`).

DeepSpeed on CPU: the accelerator is detected (`DS_ACCELERATOR=cpu` forces it), gloo carries the
collectives, the optimizer is our torch AdamW (no fused-Adam build). Its first start builds a
small shared-memory op into $TORCH_EXTENSIONS_DIR (default here: <venv>/torch_extensions), once.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from stars_scale.config import RunConfig
from stars_scale.errors import UserError
from stars_scale.checkpoint.dcp import Logical, ShardSpec
from stars_scale.parallel.optim import build_optimizer, build_scheduler

MOMENTS = ("exp_avg", "exp_avg_sq")


def _unlike(saved, fresh, at: str) -> str | None:
    """Where the JSON `saved` differs in shape from `fresh` (a state of the same object), or None.
    A key `fresh` has and `saved` lacks keeps its fresh value (a state of an older torch); a key
    `saved` adds would become an attribute of the object, and is refused."""
    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            return f"{at}: expected a JSON object, got {type(saved).__name__}"
        extra = sorted(set(saved) - set(map(str, fresh)))
        if extra:
            return f"{at}: unknown key {extra[0]!r}"
        return next((p for k, v in fresh.items() if str(k) in saved and (p := _unlike(saved[str(k)], v, f"{at}.{k}"))),
                    None)
    if isinstance(fresh, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(fresh):
            got = f"a list of {len(saved)}" if isinstance(saved, list) else type(saved).__name__
            return f"{at}: expected a list of {len(fresh)}, got {got}"
        return next((p for i, (a, b) in enumerate(zip(saved, fresh)) if (p := _unlike(a, b, f"{at}[{i}]"))), None)
    if fresh is None or isinstance(fresh, bool):
        ok = saved is None or type(saved) is type(fresh)
    elif isinstance(fresh, (int, float)):
        ok = (isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
              and (isinstance(saved, int) or not isinstance(fresh, int)) and abs(saved) <= 2**62)
    else:
        ok = type(saved) is type(fresh)
    return None if ok else f"{at}: expected {type(fresh).__name__} (finite), got {str(saved)[:40]!r}"


def load_schedule(scheduler, state: dict, where: str = "checkpoint state") -> None:
    """The learning-rate schedule from a checkpoint's JSON state, and its rate in the optimizer.
    The state must have the shape of this scheduler's own (same keys, types and list lengths,
    finite numbers): anything else is refused in one line before it is used."""
    problem = _unlike(state, scheduler.state_dict(), "scheduler")
    if problem:
        raise UserError(f"{where}: {problem}")
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def _adamw_state(optimizer, p: torch.Tensor) -> dict:
    """AdamW's state of `p`; before its first update, AdamW's fresh state (step 0, zero moments),
    which gives the same next update as no state."""
    st = optimizer.state[p]
    if not st:
        st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                  exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
    return st


def _scalar_spec() -> ShardSpec:
    return ShardSpec(())


def _counted(p: torch.Tensor, tp_rank: int) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False)) or tp_rank == 0


def global_grad_norm(params, ps) -> float:
    """sqrt(Σ g²) over the whole model, every parameter counted once (grads already DP-averaged)."""
    sq = torch.zeros((), dtype=torch.float64, device=ps.device)
    for p in params:
        if p.grad is not None and _counted(p, ps.tp_rank):
            sq += p.grad.detach().double().pow(2).sum()
    if ps.tp * ps.pp > 1:
        dist.all_reduce(sq, group=ps.mp_group)
    return float(sq.sqrt())


class PlainDataParallel:
    """zero 0: every rank holds all of its stage's optimizer state; gradients are all-reduced
    (averaged) over the data-parallel group in one flat buffer per dtype after the backward."""

    zero = 0

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, ps, backwards_per_step: int):
        self.model, self.cfg, self.ps = model, cfg, ps
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, cfg.optim)

    def backward(self, root: torch.Tensor) -> None:
        root.backward()

    def _allreduce_grads(self) -> None:
        if self.ps.dp == 1:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        for dtype in {g.dtype for g in grads}:
            group = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat, group=self.ps.dp_group)
            flat /= self.ps.dp
            offset = 0
            for g in group:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def step(self) -> float:
        # A parameter without a gradient (unused this step) has none on every data-parallel
        # peer too; like torch's AdamW on one process, the update skips it.
        self._allreduce_grads()
        norm = global_grad_norm(self.params, self.ps)
        if not math.isfinite(norm):  # the same on every rank: skip the update (train/nonfinite.py)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return norm
        coef = self.cfg.optim.grad_clip / (norm + 1e-6)
        if self.cfg.optim.grad_clip > 0 and coef < 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def scale_lr(self, factor: float) -> None:
        """Scale the whole schedule (a rollback after non-finite steps); kept in the scheduler state."""
        self.scheduler.base_lrs = [b * factor for b in self.scheduler.base_lrs]
        for g in self.optimizer.param_groups:
            g["lr"] *= factor

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def state_bytes(self) -> dict[str, int]:
        return _state_bytes(self.params, self.optimizer.state.values())

    def logical_state(self, specs, loading: bool) -> dict[str, Logical]:
        """AdamW's state of every parameter, sharded like the parameter. A parameter that never
        had a gradient gets AdamW's fresh state (step 0, zero moments: the same next update)."""
        out = {}
        for name, p, spec in specs:
            if not (isinstance(p, torch.nn.Parameter) and p.requires_grad):
                continue
            st = _adamw_state(self.optimizer, p)
            for key in MOMENTS:
                out[f"optim/{name}/{key}"] = Logical(spec.shape, st[key].dtype).add_local(st[key], spec)
            out[f"optim/{name}/step"] = Logical((), st["step"].dtype).add_local(st["step"], _scalar_spec())
        return out

    def after_load(self) -> None:
        pass


def _state_bytes(params, states) -> dict[str, int]:
    out = {"params": sum(p.numel() * p.element_size() for p in params), "grads": 0, "optimizer": 0}
    for st in states:
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0:
                out["optimizer"] += v.numel() * v.element_size()
    return out


class ZeroDataParallel:
    """zero 1 / 2 through `deepspeed.initialize` with our AdamW, the mpu adapter and clipping.

    DeepSpeed's gradient accumulation counts our backward calls (`backwards_per_step`), so its
    boundary (reduction, clipping, update) falls on the last backward of each step.
    """

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, ps, backwards_per_step: int):
        import os
        import sys
        from pathlib import Path

        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        # DeepSpeed JIT-builds a small comm op at its first start (60-120 s on 2 cores): keep it
        # beside the environment so it is built once per venv (and cached with it in CI)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
        import deepspeed

        from stars_scale.parallel.state import DeepSpeedMPU

        self.cfg, self.ps, self.zero = cfg, ps, cfg.parallel.zero
        base = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(base, cfg.train.steps, cfg.optim)
        rows = cfg.data.batch_size // (ps.dp * cfg.parallel.microbatches)
        ds_config = {
            "train_micro_batch_size_per_gpu": max(1, rows),
            "gradient_accumulation_steps": backwards_per_step,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": self.zero, "overlap_comm": False, "contiguous_gradients": True,
                                  "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
            # a non-finite global norm skips the update (fp32 always; bf16 only with this)
            "bf16": {"enabled": cfg.train.dtype == "bf16", "check_grad_overflow": True},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=base, config=ds_config,
                                                                 mpu=DeepSpeedMPU(ps), dist_init_required=False)
        self.base = base

    def backward(self, root: torch.Tensor) -> None:
        self.engine.backward(root, scale_wrt_gas=False)
        self.engine.step()  # a no-op until the accumulation boundary (the step's last backward)

    def step(self) -> float:
        self.scheduler.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.base.param_groups[0]["lr"]

    def load(self, directory, tag: str) -> None:
        _, client = self.engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if client is None:
            from stars_scale.errors import UserError

            raise UserError(f"{directory}: no DeepSpeed checkpoint {tag!r} for this layout")
        self.scheduler.load_state_dict(client["scheduler"])

    def logical_state(self, specs, loading: bool) -> dict[str, Logical]:
        """This rank's ZeRO partition as logical pieces: each parameter's fragment (a flat range
        of it, DeepSpeed's `_hp_mapping`) of the fp32 master (`model/`, when saving; a load fills
        the whole model and `after_load` copies it into the master) and of AdamW's moments; the
        step count of the fragment's group (one per group under ZeRO) for each parameter."""
        opt = self.optimizer
        out = {}
        for name, p, spec in specs:
            m = getattr(p, "_hp_mapping", None)
            if not isinstance(p, torch.nn.Parameter) or not p.requires_grad:
                continue
            entries = {f"optim/{name}/{k}": Logical(spec.shape, torch.float32) for k in MOMENTS}
            if not loading:
                entries[f"model/{name}"] = Logical(spec.shape, torch.float32)
            out.update(entries)
            if m is None:  # no part of it in this rank's partition
                continue
            flat = opt.single_partition_of_fp32_groups[m.param_group_index]
            st = _adamw_state(opt.optimizer, flat)
            hp, lp = m.get_hp_fragment_address(), m.lp_fragment_address
            for key in MOMENTS:
                entries[f"optim/{name}/{key}"].add_flat(st[key].narrow(0, hp.start, hp.numel), lp.start, p.shape, spec)
            if not loading:
                entries[f"model/{name}"].add_flat(flat.narrow(0, hp.start, hp.numel), lp.start, p.shape, spec)
            out[f"optim/{name}/step"] = Logical((), st["step"].dtype).add_local(st["step"], _scalar_spec())
        return out

    def after_load(self) -> None:
        """The fp32 master partition from the (just loaded) model weights."""
        for p in self.engine.module.parameters():
            m = getattr(p, "_hp_mapping", None)
            if m is not None:
                m.update_hp()

    def state_bytes(self) -> dict[str, int]:
        out = _state_bytes(self.engine.module.parameters(), self.optimizer.optimizer.state.values())
        for t in getattr(self.optimizer, "single_partition_of_fp32_groups", []):  # the rank's fp32 master partition
            out["optimizer"] += t.numel() * t.element_size()
        return out


def build_data_parallel(model: torch.nn.Module, cfg: RunConfig, ps, backwards_per_step: int, zero: int):
    """The optimizer step of this layout: zero 0 (one process too) or DeepSpeed ZeRO 1 / 2."""
    cls = PlainDataParallel if zero == 0 else ZeroDataParallel
    return cls(model, cfg, ps, backwards_per_step)


def deepspeed_pickled_globals() -> list:
    """The classes DeepSpeed's ZeRO checkpoint files reference: all its weights_only=False load may
    build (checked by the restricted unpickler first, see checkpoint.check_tensor_files)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]
