"""Process groups: tp × pp × dp from megatron-core's `parallel_state`, and a DeepSpeed `mpu`.

The world is factored as tp (fastest) × dp × pp (slowest), megatron-core's default order
"tp-cp-ep-dp-pp": data parallelism is whatever remains after tp × pp. Backend: nccl when CUDA is
available, gloo otherwise. Every layout check runs *before* `init_process_group`, so a bad
layout fails with one clear `ConfigError` on every rank instead of hanging in a collective
(the rules: `layout.py`).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stars_scale.config import RunConfig
from stars_scale.parallel.layout import check_layout


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun / the Slurm wrapper export them (1 process: 0, 1, 0)."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def wants_parallel(cfg: RunConfig) -> bool:
    """True when this run needs the multi-process trainer (launched by torchrun, or tp/pp > 1)."""
    return world_from_env()[1] > 1 or cfg.parallel.tp > 1 or cfg.parallel.pp > 1


@dataclass
class ParallelState:
    """This rank's place in the tp × pp × dp grid and the groups it talks over."""

    rank: int
    world: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    tp_group: object
    dp_group: object
    mp_group: object  # tp × pp: the model-parallel group (gradient norms are summed over it)
    pp_group: object
    pp_ranks: list  # global ranks of this rank's pipeline, stage order

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def next_rank(self) -> int:
        """Global rank of the next stage; the last stage's next is the first (the loop's ring)."""
        return self.pp_ranks[(self.pp_rank + 1) % self.pp]

    @property
    def prev_rank(self) -> int:
        return self.pp_ranks[(self.pp_rank - 1) % self.pp]

    @property
    def is_logger(self) -> bool:
        """The one rank that logs metrics and talks to MLflow: the last stage's first rank."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0

    logger_rank: int = -1  # global rank of the logger, found at init (not derived from a rank order)

    @property
    def layout(self) -> str:
        return f"tp{self.tp}-pp{self.pp}-dp{self.dp}"


def single_process(device: torch.device) -> ParallelState:
    """One process: every dimension 1, no process group (every collective is skipped)."""
    return ParallelState(rank=0, world=1, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0, device=device,
                         tp_group=None, dp_group=None, mp_group=None, pp_group=None, pp_ranks=[0], logger_rank=0)


def init_parallel(cfg: RunConfig, timeout_s: float = 600.0) -> ParallelState:
    """init_process_group + megatron-core's model-parallel groups; validated before anything blocks.
    A run that needs no second process gets `single_process` (no process group)."""
    rank, world, local_rank = world_from_env()
    cuda = torch.cuda.is_available()
    dp = check_layout(cfg, world, cuda=cuda)
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not wants_parallel(cfg):
        return single_process(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ and world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timeout,
                                store=_restart_store(world, timeout))
    from megatron.core import parallel_state as mps

    if mps.model_parallel_is_initialized():  # a new layout in the same world (tests run several)
        mps.destroy_model_parallel()
    mps.initialize_model_parallel(tensor_model_parallel_size=cfg.parallel.tp,
                                  pipeline_model_parallel_size=cfg.parallel.pp,
                                  create_gloo_process_groups=False)
    state = ParallelState(
        rank=rank, world=world, tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=dp,
        tp_rank=mps.get_tensor_model_parallel_rank(), pp_rank=mps.get_pipeline_model_parallel_rank(),
        dp_rank=mps.get_data_parallel_rank(), device=device,
        tp_group=mps.get_tensor_model_parallel_group(), dp_group=mps.get_data_parallel_group(),
        mp_group=mps.get_model_parallel_group(), pp_group=mps.get_pipeline_model_parallel_group(),
        pp_ranks=list(dist.get_process_group_ranks(mps.get_pipeline_model_parallel_group())),
    )
    who = torch.tensor([rank if state.is_logger else -1], dtype=torch.int64, device=device)
    dist.all_reduce(who, op=dist.ReduceOp.MAX)
    state.logger_rank = int(who.item())
    return state


def _restart_store(world: int, timeout: datetime.timedelta):
    """Under torchrun (the agent hosts the store), a store whose keys are this attempt's own.

    torchrun keeps one TCPStore (the rendezvous's) across the restarts of a job and torch's env://
    rendezvous adds no per-attempt prefix, so after a restart gloo read the dead workers'
    addresses from the previous attempt and waited to connect to them (the restart hung in
    `init_process_group`). None elsewhere (env:// as usual)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"/stars/attempt_{attempt}", store)


def destroy_parallel() -> None:
    from megatron.core import parallel_state as mps

    mps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeepSpeedMPU:
    """The `mpu` DeepSpeed asks for (duck-typed getters); megatron's parallel_state lacks
    `get_model_parallel_rank/world_size`, so it cannot be passed as is.

    `get_<dim>_rank()`, `get_<dim>_world_size()`, `get_<dim>_group()` for the dims below. model
    parallel = tp × pp (the group gradient norms are summed over); DeepSpeed counts a parameter
    without the `tensor_model_parallel` attribute only on tensor-parallel rank 0, so a
    replicated norm weight is counted once per pipeline stage.
    """

    def __init__(self, ps: ParallelState):
        self.dims = {"model_parallel": (dist.get_rank(ps.mp_group), ps.tp * ps.pp, ps.mp_group),
                     "tensor_model_parallel": (ps.tp_rank, ps.tp, ps.tp_group),
                     "pipeline_model_parallel": (ps.pp_rank, ps.pp, ps.pp_group),
                     "data_parallel": (ps.dp_rank, ps.dp, ps.dp_group)}

    def __getattr__(self, name: str):
        for dim, values in self.__dict__.get("dims", {}).items():
            for what, value in zip(("rank", "world_size", "group"), values):
                if name == f"get_{dim}_{what}":
                    return lambda: value
        raise AttributeError(name)
