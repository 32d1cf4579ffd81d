"""Peak memory of one training step against loop depth (measured, fresh process per point).

    python bench/memory_depth.py [--depths 4,8,16,32,64] [--backprop 8]

Rows: truncated BPTT k with loop checkpointing (the recommended setting), and for contrast full
backprop without checkpointing (what the paper's reference code does). Figures are the step's
RSS high-water mark above the resident baseline (see bench/step_memory.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def measure(depth: int, checkpointing: str, backprop: int | None, hidden: int, batch: int, seq: int) -> float:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            "from step_memory import step_peak_memory_mb as f; "
            f"print(json.dumps(f({depth}, {checkpointing!r}, {backprop!r}, hidden={hidden}, batch={batch}, seq={seq})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["peak_mb"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="4,8,16,32,64")
    ap.add_argument("--backprop", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=20)
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    rows = {
        f"k={args.backprop}, loop checkpointing": ("loop", args.backprop),
        "full BPTT, no checkpointing": ("none", None),
    }
    print(f"peak MB above baseline of one step; d={args.hidden}, batch {args.batch}x{args.seq}")
    print(f"{'setting':34s} " + " ".join(f"{'r=' + str(d):>8s}" for d in depths) + f" {'r64/r8':>8s}")
    for name, (ck, k) in rows.items():
        peaks = [measure(d, ck, k, args.hidden, args.batch, args.seq) for d in depths]
        ratio = ""
        if 8 in depths and 64 in depths:
            ratio = f"{peaks[depths.index(64)] / max(peaks[depths.index(8)], 1e-9):8.2f}"
        print(f"{name:34s} " + " ".join(f"{p:8.1f}" for p in peaks) + f" {ratio}")


if __name__ == "__main__":
    main()
