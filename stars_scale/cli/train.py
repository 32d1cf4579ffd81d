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
        if ds:
            summary.update(_print_depth_table(ds))
            _print_continuations(trainer, ds)
        summary["out"] = str(out)
        if trainer.run_id:
            summary["mlflow_run_id"] = trainer.run_id
        print(json.dumps(summary))
        return 0

    return run_cli(body)


def _print_depth_table(ds: dict) -> dict:
    """The depth sweep as a table on stderr; the best depth (by accuracy, else by loss) for the summary."""
    depths = ds["depths"]
    rows = [("depth", [f"{d:>7d}" for d in depths])]
    if ds.get("accuracy") is not None:
        rows.append(("accuracy", [f"{a:7.3f}" for a in ds["accuracy"]]))
    rows.append(("val loss", [f"{v:7.3f}" for v in ds["loss"]]))
    if ds.get("accuracy") is None:
        rows.append(("perplexity", [f"{p:7.2f}" if p < 1e5 else f"{p:7.1e}" for p in ds["perplexity"]]))
    rows.append(("|dh|/|h|", [f"{v:7.4f}" for v in ds["delta_h"]]))
    rows.append(("rho", [f"{r:7.3f}" for r in ds["rho"]]))
    for name, cells in rows:
        print(f"{name:<10} " + " ".join(cells), file=sys.stderr)
    if ds.get("accuracy") is not None:
        best = max(range(len(depths)), key=lambda i: ds["accuracy"][i])
        return {"best_depth": depths[best], "best_accuracy": ds["accuracy"][best]}
    best = min(range(len(depths)), key=lambda i: ds["loss"][i])
    return {"best_depth": depths[best], "best_val_loss": ds["loss"][best], "best_perplexity": ds["perplexity"][best]}


def _print_continuations(trainer, ds: dict, n_prompts: int = 3, prompt_tokens: int = 32,
                         new_tokens: int = 48) -> None:
    """Text runs: sampled continuations of the first val blocks at the training depth and the sweep's deepest,
    from the final checkpoint as `stars-generate` reads it (this rank alone: no collective)."""
    import torch

    from stars_scale.data.shards import Manifest
    from stars_scale.data.verify import first_blocks
    from stars_scale.errors import UserError
    from stars_scale.generate import GenerateOptions, generate_many
    from stars_scale.generate.load import default_depth, load_codec, load_model

    cfg = trainer.cfg
    if cfg.data.kind != "shards" or not cfg.data.path:
        return
    manifest = Manifest.load(cfg.data.path)
    if manifest.kind != "text" or "val" not in manifest.splits:
        return
    try:
        run, model, wdir = load_model(trainer.out)
    except UserError as e:
        print(f"no continuations: {e}", file=sys.stderr)
        return
    codec = load_codec(run, wdir)
    n_prompt = min(prompt_tokens, cfg.model.max_seq_len // 2)  # room for the continuation
    n_new = min(new_tokens, cfg.model.max_seq_len - n_prompt)
    prompts = [b.tokens[:n_prompt].astype("int64").tolist() for b in first_blocks(manifest, "val", n_prompts)]
    for depth in sorted({default_depth(run), max(ds["depths"])}):
        opts = GenerateOptions(max_new_tokens=n_new, depth=depth, temperature=0.8, top_k=40,
                               eos_id=codec.eos_id, seed=cfg.seed)
        with torch.no_grad():
            outs = generate_many(model, prompts, opts)
        print(f"=== continuations at depth {depth} (temperature 0.8, top-k 40): prompt»continuation«", file=sys.stderr)
        for i, (p, (toks, _)) in enumerate(zip(prompts, outs)):
            print(f"--- val block {i}\n{codec.decode(p)}»{codec.decode(toks)}«", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
