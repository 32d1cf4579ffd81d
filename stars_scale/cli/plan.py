"""`stars-plan`: memory and FLOP plan of a looped-model run on a given cluster.

    stars-plan --config configs/huginn_3p5b.yaml --nodes 4 --gpus-per-node 8 [--gpu h100]

Prints the parameter split, the depth statistics of the configured sampler, FLOPs per token,
every (tp, pp, ZeRO) layout with its per-GPU memory and whether it fits (and why not), and the
throughput and days to a token budget at a given MFU. See docs/plan.md for the model behind it.
"""
from __future__ import annotations

import argparse
import json

from stars_scale.config import load_config
from stars_scale.errors import run_cli
from stars_scale.plan import GPUS, format_plan, plan, plan_to_dict


def build_parser() -> argparse.ArgumentParser:
    from stars_scale.cli.flags import OneLineParser, float_flag, int_flag

    p = OneLineParser(prog="stars-plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set train.checkpointing=loop (repeatable)")
    p.add_argument("--nodes", type=int_flag("count"), required=True)
    p.add_argument("--gpus-per-node", type=int_flag("count"), required=True)
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--mfu", type=float_flag(0.0, 1.0, lo_open=True), default=0.4, help="model FLOPs utilisation (0.4)")
    p.add_argument("--tokens", type=float_flag(0.0, lo_open=True), default=1e12, help="token budget (1e12)")
    p.add_argument("--micro-batch", type=int_flag("count"),
                   help="sequences per microbatch per rank (default: data.batch_size / (dp x parallel.microbatches) "
                        "of the config's layout)")
    p.add_argument("--seq-len", type=int_flag("width"), help="tokens per sequence (default model.max_seq_len)")
    p.add_argument("--usable", type=float_flag(0.0, 1.0, lo_open=True), default=0.9,
                   help="fraction of GPU memory available to the run (0.9: context, workspace, "
                        "fragmentation)")
    p.add_argument("--draws", type=int_flag("draws"), default=10_000, help="depth samples for the statistics")
    p.add_argument("--show", choices=("all", "fit", "config"), default="all",
                   help="which layouts to list (the config's layout is always listed)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _run(args: argparse.Namespace) -> None:
    run = load_config(args.config, args.set)
    p = plan(run, args.nodes, args.gpus_per_node, args.gpu, mfu=args.mfu, tokens=args.tokens,
             batch=args.micro_batch, seq=args.seq_len, usable_fraction=args.usable,
             draws=args.draws, config_path=args.config)
    print(json.dumps(plan_to_dict(p), indent=2) if args.json else format_plan(p, args.show))


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _main(argv))  # a bad flag is one line and exit 2, like any UserError


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args))  # exit 0, or 2 with one line on a UserError


if __name__ == "__main__":
    raise SystemExit(main())
