"""The parallel layout of a Slurm job: nodes x processes per node against the layout rules."""
from __future__ import annotations

from dataclasses import dataclass

from stars_scale.config import RunConfig
from stars_scale.errors import UserError
from stars_scale.parallel.layout import layout_problems


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int  # 0: CPU job (gloo)
    procs_per_node: int  # ranks per node: one per GPU, or --procs-per-node on CPU
    tp: int
    pp: int

    @property
    def world(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def warnings(self) -> list[str]:
        if self.nodes > 1 and self.tp > self.procs_per_node:
            return [f"parallel.tp {self.tp} spans nodes ({self.procs_per_node} processes per node): "
                    "tensor parallelism across nodes is slow"]
        return []

    def describe(self) -> str:
        dev = f"{self.gpus_per_node} GPUs" if self.gpus_per_node else f"{self.procs_per_node} CPU processes"
        return (f"{self.nodes} node(s) x {dev} = world {self.world}: "
                f"tp {self.tp} x pp {self.pp} x dp {self.dp}")


def procs_per_node(gpus_per_node: int, requested: int | None) -> int:
    if gpus_per_node < 0:
        raise UserError(f"--gpus-per-node: must be >= 0, got {gpus_per_node}")
    if requested is not None and requested < 1:
        raise UserError(f"--procs-per-node: must be >= 1, got {requested}")
    if gpus_per_node > 0:
        if requested is not None and requested != gpus_per_node:
            raise UserError(f"--procs-per-node {requested}: GPU jobs run one process per GPU "
                            f"(--gpus-per-node {gpus_per_node}); leave --procs-per-node out")
        return gpus_per_node
    return requested or 1


def check_layout(cfg: RunConfig, nodes: int, gpus_per_node: int, procs: int | None,
                 where: str = "") -> Layout:
    """Raise UserError when the config cannot run on the allocation: the trainer's own layout
    rules (`stars_scale.parallel.layout`), checked at submission instead of on the cluster."""
    if nodes < 1:
        raise UserError(f"--nodes: must be >= 1, got {nodes}")
    per_node = procs_per_node(gpus_per_node, procs)
    lay = Layout(nodes, gpus_per_node, per_node, cfg.parallel.tp, cfg.parallel.pp)
    devices = (f"--nodes {nodes} x --gpus-per-node {gpus_per_node}" if gpus_per_node
               else f"--nodes {nodes} x --procs-per-node {per_node}")
    problems = layout_problems(cfg, lay.world, allocation=devices, cuda=gpus_per_node > 0)
    if problems:
        raise UserError(f"{where}: {problems[0]}" if where else problems[0])
    return lay
