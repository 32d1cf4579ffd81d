"""The `hf` export: any LoopedLM as a self-describing Hugging Face directory.

Huginn and Ouro can only hold the LoopedLMs their own code builds; a retrofitted Llama or a
model trained here with other options has no upstream class. This format keeps the tensors
under LoopedLM's own names and the full ModelConfig (and depth schedule) in config.json under
`stars_scale`, next to the usual HF keys tools read (hidden_size, vocab_size, ...), so
`stars-convert import --from hf` reads it back bit-exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from stars_scale.config import RunConfig, config_from_dict
from stars_scale.convert.checkpoint import expected_shapes
from stars_scale.convert.hfdir import HFDir
from stars_scale.errors import ConfigError, UserError
from stars_scale.model.fused import fuse_state_dict, unfuse_state_dict

MODEL_TYPE = "stars_looped"
ARCH = "StarsLoopedLM"


def import_native(src: HFDir) -> tuple[RunConfig, dict[str, torch.Tensor], dict[str, Any]]:
    cp = src.config_path
    if src.config.get("model_type") != MODEL_TYPE:
        raise UserError(f"{cp}: model_type {src.config.get('model_type')!r} is not {MODEL_TYPE!r}; "
                        f"not written by `stars-convert export --to hf`")
    block = src.cfg("stars_scale", types=dict)
    try:
        run = config_from_dict({k: v for k, v in block.items() if k in ("model", "depth")})
    except ConfigError as e:
        raise UserError(f"{cp}: stars_scale section: {e}") from None
    for key, want in _hf_keys(run.model).items():
        if key in src.config and src.config[key] != want:
            raise UserError(f"{cp}: {key} is {src.config[key]!r} but the stars_scale section's model gives {want!r}; "
                            "the two disagree (edited by hand?): make them agree or re-export")
    want = expected_shapes(run.model)
    if any(name.endswith("attn.q_proj.weight") for name in src.files):  # written before the fusion
        with torch.device("meta"):
            meta = unfuse_state_dict({k: torch.empty(s) for k, s in want.items()}, run.model)
        want = {k: tuple(t.shape) for k, t in meta.items()}
    sd = {name: src.get(name, shape) for name, shape in want.items()}
    src.require_all_used(MODEL_TYPE)
    return run, fuse_state_dict(sd, run.model), {}


def _hf_keys(m) -> dict[str, Any]:
    """The usual HF config.json keys, derived from the ModelConfig (written on export, checked on import)."""
    return {"hidden_size": m.hidden, "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads or m.heads,
            "num_hidden_layers": m.n_prelude + m.n_core + m.n_coda, "vocab_size": m.vocab_size,
            "max_position_embeddings": m.max_seq_len, "tie_word_embeddings": m.tie_embeddings}


def export_native(run: RunConfig, sd: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    m = run.model
    config = {
        "architectures": [ARCH], "model_type": MODEL_TYPE, **_hf_keys(m),
        "torch_dtype": str(sd["embed.weight"].dtype).replace("torch.", ""),
        "stars_scale": {"model": dataclasses.asdict(m), "depth": dataclasses.asdict(run.depth)},
    }
    out = {k: v for k, v in sd.items() if not (m.tie_embeddings and k == "lm_head.weight")}
    return config, out
