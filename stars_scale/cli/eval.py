"""`stars-eval depth --checkpoint DIR --depths 1,2,4,8,16,32,64 [--out DIR]`: test-time scaling."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stars_scale.cli.common import run_cli


def parse_depths(text: str) -> list[int]:
    from stars_scale.errors import UserError

    try:
        depths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--depths: expected comma-separated positive integers, got {text!r}") from None
    if not depths or min(depths) < 1:
        raise UserError(f"--depths: expected comma-separated positive integers, got {text!r}")
    return depths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stars-eval", description="Evaluate a looped LM.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("depth", help="accuracy / loss, ||dh|| and rho against test-time loop depth")
    d.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (its latest checkpoint)")
    d.add_argument("--depths", default="1,2,4,8,16,32,64", help="comma-separated depths")
    d.add_argument("--out", default=None, help="output dir (default: <run>/eval_<checkpoint>)")
    d.add_argument("--samples", type=int, default=None, help="test samples (default: the config's eval.samples)")
    d.add_argument("--rho-iters", type=int, default=None, help="power iterations for rho (default: config)")
    d.add_argument("--no-mlflow", action="store_true", help="do not log to the run's MLflow entry")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        import torch

        from stars_scale.config import load_config
        from stars_scale.data.sources import build_eval_batch
        from stars_scale.errors import UserError
        from stars_scale.eval.depth_scaling import depth_sweep, write_depth_scaling
        from stars_scale.model.looped import LoopedLM
        from stars_scale.train import checkpoint as ckpt

        depths = parse_depths(args.depths)
        path = ckpt.resolve_checkpoint(args.checkpoint)
        cfg_path = path / "config.yaml"
        if not cfg_path.is_file():
            raise UserError(f"{cfg_path}: missing from the checkpoint")
        cfg = load_config(cfg_path)
        state = ckpt.load_state(path)
        model = LoopedLM(cfg.model)
        try:
            model.load_state_dict(ckpt.load_tensor_file(path / "model.pt"))
        except RuntimeError as e:
            raise UserError(f"{path / 'model.pt'}: does not match the checkpoint's config ({e})") from None
        samples = args.samples or cfg.eval.samples
        if samples < 1:
            raise UserError(f"--samples: must be >= 1, got {samples}")
        batch, has_acc = build_eval_batch(cfg, samples)
        with torch.no_grad():
            results = depth_sweep(model, batch, depths, rho_iters=args.rho_iters or cfg.eval.rho_iters,
                                  batch_size=cfg.eval.batch_size, seed=cfg.seed, has_accuracy=has_acc)
        results["step"] = state.get("step")
        results["checkpoint"] = str(path)
        out = Path(args.out) if args.out else path.parent.parent / f"eval_{path.name}"
        jpath, ppath = write_depth_scaling(results, out, title=f"{path.parent.parent.name} @ {path.name}")
        run_id = state.get("mlflow_run_id")
        if run_id and cfg.tracking.mlflow and not args.no_mlflow:
            _log_to_run(cfg, run_id, results, jpath, ppath)
        print(json.dumps({k: results[k] for k in ("depths", "accuracy", "loss", "rho", "delta_h")}))
        return 0

    return run_cli(body)


def _log_to_run(cfg, run_id: str, results: dict, jpath: Path, ppath: Path) -> None:
    import warnings

    try:
        from stars_scale.tracking.mlflow_tracker import MlflowTracker, default_tracking_uri

        tracker = MlflowTracker(default_tracking_uri(cfg.tracking.tracking_uri), cfg.tracking.experiment,
                                run_id=run_id)
    except Exception as e:
        warnings.warn(f"MLflow run {run_id} not reachable ({type(e).__name__}: {e}); results are only on disk")
        return
    for i, d in enumerate(results["depths"]):
        m = {"eval_loss": results["loss"][i], "eval_rho": results["rho"][i], "eval_delta_h": results["delta_h"][i]}
        if results["accuracy"] is not None:
            m["eval_accuracy"] = results["accuracy"][i]
        tracker.log_metrics(m, step=d)
    tracker.log_artifact(jpath, "eval")
    tracker.log_artifact(ppath, "eval")
    tracker.close(status="FINISHED")


if __name__ == "__main__":
    sys.exit(main())
