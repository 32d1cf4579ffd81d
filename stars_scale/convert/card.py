"""The model card (README.md) written next to an exported checkpoint.

A looped model's headline number is not one score but how quality moves with test-time depth,
so the card carries the depth-scaling table when evaluation left one next to the checkpoint
(`depth_scaling.json`: {"depths": [...], "accuracy": [...], "loss": [...], "rho": [...],
"delta_h": [...]}), plus the architecture, the parameter split and the full training config.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from stars_scale.config import RunConfig
from stars_scale.convert.hfdir import read_json
from stars_scale.errors import UserError
from stars_scale.model.looped import LoopedLM

SCALING_COLUMNS = ("accuracy", "loss", "rho", "delta_h")

HOW_TO_LOAD = {
    "huginn": ("Huginn/raven format. Load with the upstream `raven_modeling_minimal.py` and "
               "`raven_config_minimal.py` (seal-rg/recurrent-pretraining) placed in this directory "
               "with an `auto_map` entry and `trust_remote_code=True`, or re-import with "
               "`stars-convert import --from huginn`."),
    "ouro": ("Ouro format. Load with Ouro's `modeling_ouro.py` (`trust_remote_code=True`), or "
             "re-import with `stars-convert import --from ouro`."),
    "hf": ("stars_scale's own format (`model_type: stars_looped`): LoopedLM tensor names, the "
           "model config under `stars_scale` in config.json. Re-import with "
           "`stars-convert import --from hf`, then `LoopedLM(cfg).load_state_dict(sd)`."),
}


def load_depth_scaling(path: Path) -> dict[str, list] | None:
    """Read and check depth_scaling.json (None when absent): equal-length numeric columns."""
    if not path.is_file():
        return None
    data = read_json(path)
    depths = data.get("depths")
    if not isinstance(depths, list) or not depths or not all(isinstance(d, int) and not isinstance(d, bool)
                                                              for d in depths):
        raise UserError(f"{path}: 'depths' must be a non-empty list of integers")
    out: dict[str, list] = {"depths": depths}
    for col in SCALING_COLUMNS:
        if col not in data or data[col] is None:
            continue
        vals = data[col]
        if not isinstance(vals, list) or len(vals) != len(depths):
            raise UserError(f"{path}: '{col}' must be a list with one value per depth ({len(depths)})")
        for v in vals:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise UserError(f"{path}: '{col}' holds {v!r}, not a number or null")
        out[col] = vals
    return out


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def render_card(run: RunConfig, fmt: str, provenance: dict[str, Any],
                scaling: dict[str, list] | None, name: str) -> str:
    m, d = run.model, run.depth
    with torch.device("meta"):
        counts = LoopedLM(m).param_groups_counts()
    lines = [
        f"# {name}",
        "",
        "A looped (recurrent-depth) language model, exported by stars_scale's "
        "`stars-convert export`.",
        "",
        HOW_TO_LOAD[fmt],
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| layers | prelude {m.n_prelude}, core {m.n_core} (looped), coda {m.n_coda} |",
        f"| hidden / heads / kv heads | {m.hidden} / {m.heads} / {m.kv_heads or m.heads} |",
        f"| MLP | {m.mlp}, {m.mlp_hidden or 'default'} |",
        f"| norm | {m.norm} ({m.norm_placement}) |",
        f"| injection / initial state | {m.injection} / {m.init_state} |",
        f"| vocab / context | {m.vocab_size} / {m.max_seq_len} |",
        f"| tied embeddings | {m.tie_embeddings} |",
        "",
        "| parameters | count |",
        "|---|---|",
    ]
    lines += [f"| {k} | {human_count(v)} ({v:,}) |" for k, v in counts.items()]
    lines += ["", "## Depth", ""]
    if d.dist == "poisson-lognormal":
        desc = f"Poisson-lognormal, mean {d.mean:g} (sigma {d.sigma:g})"
    elif d.dist == "lognormal":
        desc = f"lognormal (mu {d.mu:g}, sigma {d.sigma:g}), clipped to [{d.min}, {d.max}]"
    elif d.dist == "fixed":
        desc = f"fixed, {d.value} iteration{'s' if d.value != 1 else ''}"
    else:
        desc = f"uniform on [{d.min}, {d.max}]"
    lines.append(f"Training depth: {desc}" + (f"; gradients through the last {d.backprop} iterations."
                                             if d.backprop else "."))
    if scaling is not None:
        cols = ["depths"] + [c for c in SCALING_COLUMNS if c in scaling]
        head = {"depths": "depth", "accuracy": "accuracy", "loss": "loss", "rho": "ρ̂",
                "delta_h": "‖Δh‖"}
        lines += ["", "### Depth scaling", "",
                  "| " + " | ".join(head[c] for c in cols) + " |",
                  "|" + "---|" * len(cols)]
        for i in range(len(scaling["depths"])):
            lines.append("| " + " | ".join(_fmt(scaling[c][i]) for c in cols) + " |")
    if provenance:
        lines += ["", "## Provenance", "", "```json"]
        lines += [json.dumps(provenance, indent=2, sort_keys=True), "```"]
    lines += ["", "## Training config", "", "```yaml",
              yaml.safe_dump(run.to_dict(), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
