"""The stars_scale converted-checkpoint directory: what `stars-convert import` writes.

    <dir>/config.yaml         the full RunConfig (model section = the converted architecture)
    <dir>/model.safetensors   the LoopedLM state dict, names as `LoopedLM.state_dict()`;
                              with tied embeddings `lm_head.weight` is left out (it *is*
                              `embed.weight`) and put back by `load_converted`
    <dir>/convert.json        provenance: source format and directory, layer selection, notes
    <dir>/depth_scaling.json  optional, written by evaluation; copied into exported model cards

`load_converted(dir)` is the one entry point a trainer needs (`init.from`): it returns the
ModelConfig and a state dict that `LoopedLM(cfg).load_state_dict(sd)` accepts strictly.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from stars_scale.config import ModelConfig, RunConfig, load_config, save_config
from stars_scale.convert.hfdir import read_json, write_safetensors
from stars_scale.errors import UserError
from stars_scale.model.fused import fuse_state_dict
from stars_scale.model.looped import LoopedLM
from stars_scale.utils import StagedDir, atomic_write_json, only_own_files

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
PROVENANCE_NAME = "convert.json"
DEPTH_SCALING_NAME = "depth_scaling.json"
FORMAT_TAG = "stars_scale.looped_lm"
# what the project writes into a converted directory (`stars-eval lm` adds eval/):
# `--overwrite` replaces a directory holding nothing else
CONVERTED_FILES = (CONFIG_NAME, WEIGHTS_NAME, PROVENANCE_NAME, DEPTH_SCALING_NAME, "eval")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the stored state dict for `cfg` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = LoopedLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor present with the right shape and nothing else; errors name the tensor."""
    want = expected_shapes(cfg)
    for name, shape in want.items():
        if name not in sd:
            raise UserError(f"{where}: tensor {name} is missing (expected shape {list(shape)})")
        if tuple(sd[name].shape) != shape:
            raise UserError(f"{where}: tensor {name} has shape {list(sd[name].shape)}, "
                            f"expected {list(shape)} from the model config")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise UserError(f"{where}: unexpected tensor(s) {', '.join(extra[:5])} for this model config")


def cast_state_dict(sd: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """keep | fp32 | bf16 (floating tensors only)."""
    if dtype == "keep":
        return sd
    target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return {k: (v.to(target) if v.is_floating_point() else v) for k, v in sd.items()}


def storable(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(sd)
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def save_converted(out: str | Path, run: RunConfig, sd: dict[str, torch.Tensor],
                   provenance: dict[str, Any], overwrite: bool = False) -> Path:
    """Write a converted checkpoint directory atomically (staged, then renamed into place)."""
    sd = storable(run.model, sd)
    check_state_dict(run.model, sd, f"converted weights for {out}")
    own = only_own_files(PROVENANCE_NAME, CONVERTED_FILES, "a converted checkpoint")
    with StagedDir(out, overwrite=overwrite, what="the converted checkpoint", replaceable=own) as staged:
        tmp = staged.path
        save_config(run, tmp / CONFIG_NAME)
        write_safetensors(tmp, sd, metadata={"format": "pt", "stars_scale": FORMAT_TAG})
        prov = dict(provenance)
        prov.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        atomic_write_json(tmp / PROVENANCE_NAME, prov)
    return Path(out)


def resolve_weights_dir(path: str | Path) -> Path:
    """A converted dir (model.safetensors), a training checkpoint (dcp/, or model.pt of older
    versions) or a training run directory (its latest complete checkpoint)."""
    from stars_scale.checkpoint import resolve_checkpoint

    from stars_scale.checkpoint import MANIFEST_FILE, STATE_FILE

    d = Path(path)
    if not d.is_dir():
        raise UserError(f"{d}: not a directory")
    # a training checkpoint is verified whatever else lies in it (a model.safetensors dropped
    # into one is an unlisted file, refused, not read as converted weights)
    if _is_training_checkpoint(d) or (d / STATE_FILE).is_file() or (d / MANIFEST_FILE).is_file():
        return resolve_checkpoint(d)
    if (d / WEIGHTS_NAME).is_file() or not (d / "checkpoints").is_dir():
        return d
    return resolve_checkpoint(d)


def _is_training_checkpoint(d: Path) -> bool:
    return (d / "model.pt").is_file() or (d / "dcp").is_dir()


def load_converted_run(path: str | Path) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """(RunConfig, state dict) of a converted checkpoint directory or a training checkpoint, validated."""
    d = resolve_weights_dir(path)
    run = load_config(d / CONFIG_NAME)
    if not (d / WEIGHTS_NAME).is_file() and _is_training_checkpoint(d):  # a stars-train checkpoint
        from stars_scale.checkpoint import read_model_state

        sd = fuse_state_dict(read_model_state(d, run.model), run.model)  # older layouts too
        check_state_dict(run.model, storable(run.model, sd), str(d))
        return run, sd
    wpath = d / WEIGHTS_NAME
    if not wpath.is_file():
        raise UserError(f"{wpath}: file not found")
    sd: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(wpath), framework="pt") as f:
            for name in f.keys():
                sd[name] = f.get_tensor(name)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{wpath}: not a readable safetensors file: {e}") from None
    sd = fuse_state_dict(sd, run.model)  # separate q/k/v, gate/up of older versions
    check_state_dict(run.model, sd, str(wpath))
    if run.model.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    return run, sd


def load_converted(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, state dict) for `LoopedLM(cfg).load_state_dict(sd)` (strict)."""
    run, sd = load_converted_run(path)
    return run.model, sd


def read_provenance(path: str | Path) -> dict[str, Any]:
    p = Path(path) / PROVENANCE_NAME
    return read_json(p) if p.is_file() else {}
