"""`stars-convert`: Hugging Face checkpoints in and out of stars_scale.

    stars-convert import --from huginn|ouro|llama|hf SRC --out CKPT
                         [--prelude 0-1 --core 16-19 --coda 20-21] [--dtype keep|fp32|bf16]
    stars-convert export --to huginn|ouro|hf CKPT --out DIR [--max-shard-size 5GB]

Local directories only (no hub access). Bad input prints one line and exits with 2.
"""
from __future__ import annotations

import argparse
import math
import re

import torch

from stars_scale.convert.card import human_count
from stars_scale.convert.api import (DTYPES, EXPORT_FORMATS, IMPORT_FORMATS, export_checkpoint,
                                     import_checkpoint)
from stars_scale.errors import UserError, run_cli
from stars_scale.model.looped import LoopedLM


def parse_size(text: str) -> int | None:
    """'5GB', '500MB', '1.5GiB', '0' (no sharding) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B?)\s*", text.upper())
    if not m:
        raise UserError(f"--max-shard-size {text!r}: expected a size like 5GB or 500MB")
    value, prefix, suffix = float(m.group(1)), m.group(2), m.group(3)
    base = 1024 if suffix.startswith("I") else 1000
    size = value * base ** " KMGT".index(prefix or " ")
    if not math.isfinite(size) or size >= 2**63:
        raise UserError(f"--max-shard-size {text[:40]!r}: too large (0 means: never shard)")
    n = int(size)
    return None if n == 0 else n


def build_parser() -> argparse.ArgumentParser:
    from stars_scale.cli.flags import OneLineParser, float_flag, int_flag

    p = OneLineParser(prog="stars-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="HF directory -> stars_scale checkpoint directory")
    imp.add_argument("src", help="local HF directory (config.json + *.safetensors)")
    imp.add_argument("--from", dest="fmt", required=True, choices=IMPORT_FORMATS)
    imp.add_argument("--out", required=True, help="checkpoint directory to write")
    imp.add_argument("--prelude", help="llama: layers for the prelude, e.g. 0-1 (default none)")
    imp.add_argument("--core", help="llama: layers to loop, e.g. 16-19 (required)")
    imp.add_argument("--coda", help="llama: layers for the coda, e.g. 20-21 (default none)")
    imp.add_argument("--state-weight", type=float_flag(0.0, 1.0), default=0.5,
                     help="llama: adapter weight a on the state; (1-a) goes to the input (0.5)")
    imp.add_argument("--dtype", choices=DTYPES, default="keep")
    imp.add_argument("--max-seq-len", type=int_flag("width"), help="override the context length")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    exp = sub.add_parser("export", help="stars_scale checkpoint -> HF directory")
    exp.add_argument("ckpt", help="stars_scale checkpoint directory (config.yaml + model.safetensors)")
    exp.add_argument("--to", dest="fmt", required=True, choices=EXPORT_FORMATS)
    exp.add_argument("--out", required=True, help="HF directory to write")
    exp.add_argument("--dtype", choices=DTYPES, default="keep")
    exp.add_argument("--max-shard-size", default="5GB", help="shard above this size (0: never)")
    exp.add_argument("--name", help="model name for the model card (default: --out's name)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "import":
        res = import_checkpoint(args.fmt, args.src, args.out, overwrite=args.overwrite,
                                dtype=args.dtype, max_seq_len=args.max_seq_len,
                                prelude=args.prelude, core=args.core, coda=args.coda,
                                state_weight=args.state_weight)
        with torch.device("meta"):
            counts = LoopedLM(res.run.model).param_groups_counts()
        parts = ", ".join(f"{k} {human_count(v)}" for k, v in counts.items() if k != "total")
        m = res.run.model
        print(f"imported {args.fmt} {args.src} -> {args.out}: {human_count(counts['total'])} "
              f"parameters ({parts}); prelude {m.n_prelude}, core {m.n_core}, coda {m.n_coda}")
        return 0
    files = export_checkpoint(args.ckpt, args.fmt, args.out, dtype=args.dtype,
                              max_shard_bytes=parse_size(args.max_shard_size),
                              overwrite=args.overwrite, name=args.name)
    print(f"exported {args.ckpt} -> {args.out} ({args.fmt}): {', '.join(files)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _run(build_parser().parse_args(argv)))  # a bad flag is one line, exit 2


if __name__ == "__main__":
    raise SystemExit(main())
