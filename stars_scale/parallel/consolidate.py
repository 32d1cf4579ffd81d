"""The full single-device state dict of a tensor- and pipeline-parallel LoopedLM.

Inverts `tensor.parallelize_tensor` and `pipeline.split_stage`: tensor-parallel shards are
gathered over the tp group and concatenated along their `partition_dim` (vocabulary padding cut
off), stage dicts are merged over the pipeline group with core block indices shifted back to
the full model's (`checkpoint.dcp.full_name`: the logical names a checkpoint uses too). The
result loads into a plain `LoopedLM` (evaluation, export, tests).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from stars_scale.checkpoint.dcp import full_name, reference_shapes
from stars_scale.parallel.tensor import gather_shards


def full_state_dict(model, ps, core_offset: int, model_cfg) -> dict[str, torch.Tensor] | None:
    """Collective over the world: every rank calls it; the full dict comes back on every rank."""
    shapes = reference_shapes(model_cfg)
    params = dict(model.named_parameters())
    local: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        t = t.detach()
        p = params.get(name)
        if p is not None and getattr(p, "tensor_model_parallel", False) and ps.tp > 1:
            parts = [torch.empty_like(t) for _ in range(ps.tp)]
            dist.all_gather(parts, t.contiguous(), group=ps.tp_group)
            t = gather_shards(parts, p.partition_dim, getattr(p, "partition_stride", 1))
        fname = full_name(name, core_offset)
        if fname in shapes and t.shape != shapes[fname]:  # vocabulary padding
            t = t.narrow(0, 0, shapes[fname][0])
        local[fname] = t.cpu().clone()
    if ps.pp > 1:
        stages: list = [None] * ps.pp
        dist.all_gather_object(stages, local, group=ps.pp_group)
        merged: dict[str, torch.Tensor] = {}
        for d in stages:
            merged.update(d)
        local = merged
    if model_cfg.tie_embeddings:
        local["lm_head.weight"] = local["embed.weight"]
    missing = set(shapes) - set(local)
    if missing:
        raise RuntimeError(f"consolidation lost parameters: {sorted(missing)}")
    return {k: local[k] for k in shapes}
