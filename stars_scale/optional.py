"""Optional dependencies, checked before any work: a feature a config asks for whose package is
missing is refused in one line (exit 2) before the model is built, never a traceback mid-run.

- `data.kind: shards` reads WebDataset tar shards: webdataset (and braceexpand, which it imports);
- `model.attention: flash`: flash-attn, importable (a broken CUDA build counts as missing);
- `eval.depths` (the depth sweep at the end of training): matplotlib, for its plot;
- `stars-eval lm`: lm-evaluation-harness (`stars_scale.eval.lm_harness` refuses at import);
- MLflow tracking: the store the config names (`stars_scale.tracking.check_tracking`, which uses
  `missing` from here).

Presence is decided by `importlib.util.find_spec` (no import, no side effects; a module set to
None in `sys.modules` counts as missing), except flash-attn, whose import the attention module
already tried.
"""
from __future__ import annotations

import importlib.util

from stars_scale.errors import UserError


def missing(*modules: str) -> list[str]:
    """The modules among `modules` that cannot be found here."""
    out = []
    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):  # a broken parent package, or a module without a spec
            found = False
        if not found:
            out.append(m)
    return out


def check_run_dependencies(cfg) -> None:
    """Refuse (UserError, one line) a run config whose optional packages are missing here."""
    if cfg.data.kind == "shards":
        gone = missing("webdataset", "braceexpand")
        if gone:
            raise UserError(f"data.kind: shards needs {' and '.join(gone)}, not installed here "
                            "(pip install webdataset braceexpand)")
    if cfg.model.attention == "flash":
        from stars_scale.model.attention import flash_available

        if not flash_available():
            raise UserError("model.attention: flash needs flash-attn, not importable here (pip install "
                            "'stars_scale[flash]' on a CUDA machine, or set model.attention: auto)")
    if cfg.eval.depths and missing("matplotlib"):
        raise UserError("eval.depths needs matplotlib for the depth-scaling plot written at the end of the run, "
                        "not installed here (pip install matplotlib, or set eval.depths: [])")
