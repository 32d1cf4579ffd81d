"""`stars-train --config PATH [--out DIR] [--set key=value ...] [--resume [CKPT]]`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stars_scale.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stars-train", description="Train a looped LM with STARS.")
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set stars.lam=0.1 (repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="resume from the latest checkpoint in --out, or from CKPT (a checkpoint or run dir); "
                        "'--resume auto' starts fresh when --out has no checkpoint yet (requeued jobs)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="--resume a checkpoint whose run differs from this config in seed, model, depth, stars, "
                        "data or optim (refused without it; train/eval/tracking/parallel may change freely)")
    p.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                   help="stop cleanly with a checkpoint after N steps of this invocation")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from stars_scale.config import load_config
        from stars_scale.errors import UserError
        from stars_scale.optional import check_run_dependencies
        from stars_scale.tracking import check_tracking
        from stars_scale.train.trainer import Trainer

        cfg = load_config(args.config, args.overrides)
        check_run_dependencies(cfg)  # missing optional packages: one line, before any work
        check_tracking(cfg.tracking)
        if args.stop_after_steps is not None and args.stop_after_steps < 1:
            raise UserError(f"--stop-after-steps: must be >= 1, got {args.stop_after_steps}")
        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        trainer = Trainer(cfg, out, resume=args.resume, stop_after_steps=args.stop_after_steps,
                          allow_config_change=args.allow_config_change)
        result = trainer.run()
        if not trainer.reports:  # under torchrun, one rank reports
            return 0
        summary = {k: result.get(k) for k in ("step", "loss", "ce", "rho") if k in result}
        ds = result.get("depth_scaling")
        if ds and ds.get("accuracy") is not None:
            best = max(range(len(ds["depths"])), key=lambda i: ds["accuracy"][i])
            summary["best_depth"] = ds["depths"][best]
            summary["best_accuracy"] = ds["accuracy"][best]
            print("depth    " + " ".join(f"{d:>6d}" for d in ds["depths"]), file=sys.stderr)
            print("accuracy " + " ".join(f"{a:6.3f}" for a in ds["accuracy"]), file=sys.stderr)
            print("rho      " + " ".join(f"{r:6.3f}" for r in ds["rho"]), file=sys.stderr)
        summary["out"] = str(out)
        if trainer.run_id:
            summary["mlflow_run_id"] = trainer.run_id
        print(json.dumps(summary))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
