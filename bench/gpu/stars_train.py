"""`stars-train` as the GPU check runs it: `stars_scale.cli.train.main` (what the console script
calls), then, at exit or on SIGUSR2 (which the check sends before it kills a run whose figures are
already logged), the process's peak memory written to $STARS_PEAK_MEMORY_JSON:
`torch.cuda.max_memory_allocated` / `max_memory_reserved` on CUDA, the peak resident set size
(ru_maxrss) always. Nothing else differs from `stars-train ARGS`.

    python bench/gpu/stars_train.py --config C --out DIR [--set k=v ...] [--resume [CKPT]]
"""
from __future__ import annotations

import atexit
import json
import os
import resource
import signal
import sys


def _write_peak(*_) -> None:
    path = os.environ.get("STARS_PEAK_MEMORY_JSON")
    if not path:
        return
    import torch

    peak = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        peak["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(peak, f)
    os.replace(tmp, path)  # whole or absent: the check waits for the file


if __name__ == "__main__":
    atexit.register(_write_peak)
    signal.signal(signal.SIGUSR2, _write_peak)
    from stars_scale.cli.train import main

    sys.exit(main(sys.argv[1:]))
