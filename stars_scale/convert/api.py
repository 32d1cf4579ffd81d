"""Import from and export to Hugging Face directories: the functions behind `stars-convert`.

Each format module maps tensors one way and back; this module owns the rest of the path:
reading the source directory, checking the result against the LoopedLM the config builds
(every tensor, every shape), dtype, provenance, the model card and atomic directory writes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from stars_scale.config import RunConfig, bound_error
from stars_scale.convert import huginn, llama, native, ouro
from stars_scale.convert.card import load_depth_scaling, render_card
from stars_scale.convert.checkpoint import (DEPTH_SCALING_NAME, cast_state_dict, check_state_dict,
                                            load_converted_run, read_provenance, resolve_weights_dir,
                                            save_converted)
from stars_scale.convert.hfdir import INDEX_NAME, SINGLE_NAME, HFDir, write_safetensors
from stars_scale.errors import UserError
from stars_scale.utils import StagedDir, atomic_write_json, atomic_write_text, only_own_files

IMPORT_FORMATS = ("huginn", "ouro", "llama", "hf")
EXPORT_FORMATS = ("huginn", "ouro", "hf")
DTYPES = ("keep", "fp32", "bf16")
# what `export_checkpoint` writes: `--overwrite` replaces a directory holding nothing else
EXPORTED_FILES = ("config.json", SINGLE_NAME, INDEX_NAME, "model-*-of-*.safetensors", "README.md", DEPTH_SCALING_NAME)

_EXPORTERS: dict[str, Callable[[RunConfig, dict], tuple[dict, dict]]] = {
    "huginn": huginn.export_huginn, "ouro": ouro.export_ouro, "hf": native.export_native,
}


@dataclass
class ImportResult:
    run: RunConfig
    state_dict: dict[str, torch.Tensor]
    provenance: dict[str, Any]


def convert_from_hf(fmt: str, src: str | Path, *, prelude: str | None = None, core: str | None = None,
                    coda: str | None = None, state_weight: float = 0.5, dtype: str = "keep",
                    max_seq_len: int | None = None) -> ImportResult:
    """Read a local HF directory of format `fmt` into (RunConfig, LoopedLM state dict)."""
    if fmt not in IMPORT_FORMATS:
        raise UserError(f"unknown source format {fmt!r} (one of {', '.join(IMPORT_FORMATS)})")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    if fmt != "llama" and any(x is not None for x in (prelude, core, coda)):
        raise UserError("--prelude/--core/--coda select layers for --from llama only")
    hf = HFDir(src)
    if fmt == "huginn":
        run, sd, notes = huginn.import_huginn(hf)
    elif fmt == "ouro":
        run, sd, notes = ouro.import_ouro(hf)
    elif fmt == "llama":
        run, sd, notes = llama.import_llama(hf, prelude, core, coda, state_weight)
    else:
        run, sd, notes = native.import_native(hf)
    if max_seq_len is not None:
        why = bound_error(max_seq_len, "width")  # model.max_seq_len's own bounds
        if why:
            raise UserError(f"--max-seq-len: {why}")
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, max_seq_len=max_seq_len))
    check_state_dict(run.model, {k: v for k, v in sd.items()
                                 if not (run.model.tie_embeddings and k == "lm_head.weight")},
                     f"{hf.path} (converted)")
    sd = cast_state_dict(sd, dtype)
    prov = {"source_format": fmt, "source_dir": str(Path(src).resolve()),
            "source_model_type": hf.config.get("model_type"), **notes}
    return ImportResult(run=run, state_dict=sd, provenance=prov)


def import_checkpoint(fmt: str, src: str | Path, out: str | Path, overwrite: bool = False,
                      **kwargs: Any) -> ImportResult:
    """`stars-convert import`: HF directory -> stars_scale checkpoint directory."""
    res = convert_from_hf(fmt, src, **kwargs)
    save_converted(out, res.run, res.state_dict, res.provenance, overwrite=overwrite)
    return res


def export_checkpoint(ckpt: str | Path, fmt: str, out: str | Path, *, dtype: str = "keep",
                      max_shard_bytes: int | None = 5 * 10**9, overwrite: bool = False,
                      name: str | None = None) -> list[str]:
    """`stars-convert export`: stars_scale checkpoint -> HF directory with config.json, weights,
    README.md (and depth_scaling.json when the checkpoint has one). Returns the files written."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown target format {fmt!r} (one of {', '.join(EXPORT_FORMATS)})")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    ckpt = resolve_weights_dir(ckpt)
    run, sd = load_converted_run(ckpt)
    sd = cast_state_dict(sd, dtype)
    config, tensors = _EXPORTERS[fmt](run, sd)
    # beside the weights, or (a stars-train checkpoint) in its run directory
    scaling_path = next((p for p in (ckpt / DEPTH_SCALING_NAME, ckpt.parent.parent / DEPTH_SCALING_NAME)
                         if p.is_file()), ckpt / DEPTH_SCALING_NAME)
    scaling = load_depth_scaling(scaling_path)
    card = render_card(run, fmt, read_provenance(ckpt), scaling, name or Path(out).name)
    own = only_own_files("config.json", EXPORTED_FILES, "an exported model directory")
    with StagedDir(out, overwrite=overwrite, what="the exported model", replaceable=own) as staged:
        tmp = staged.path
        files = write_safetensors(tmp, tensors, metadata={"format": "pt"}, max_shard_bytes=max_shard_bytes)
        atomic_write_json(tmp / "config.json", config)
        atomic_write_text(tmp / "README.md", card)
        files += ["config.json", "README.md"]
        if scaling is not None:
            atomic_write_json(tmp / DEPTH_SCALING_NAME, scaling)
            files.append(DEPTH_SCALING_NAME)
    return files
