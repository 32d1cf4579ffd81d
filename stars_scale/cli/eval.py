"""`stars-eval depth --checkpoint DIR --depths 1,2,4,8,16,32,64 [--out DIR]`: test-time scaling."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stars_scale.errors import run_cli


def parse_depths(text: str) -> list[int]:
    """`1,2,4,1e3` -> [1, 2, 4, 1000]; each depth within the config's depth bounds."""
    from stars_scale.config import bound_error, parse_int
    from stars_scale.errors import UserError

    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UserError(f"--depths: expected comma-separated positive integers, got {text[:60]!r}")
    depths = []
    for x in items:
        d = parse_int(x)
        if d is None:
            raise UserError(f"--depths: expected comma-separated positive integers, got {x[:40]!r}")
        why = bound_error(d, "depth")
        if why:
            raise UserError(f"--depths: each depth {why} (the config's cap on loop iterations)")
        depths.append(d)
    return depths


def build_parser() -> argparse.ArgumentParser:
    from stars_scale.cli.flags import OneLineParser, float_flag, int_flag

    p = OneLineParser(prog="stars-eval", description="Evaluate a looped LM.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("depth", help="accuracy / loss, ||dh|| and rho against test-time loop depth")
    d.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (its latest checkpoint)")
    d.add_argument("--depths", type=parse_depths, default="1,2,4,8,16,32,64", help="comma-separated depths")
    d.add_argument("--out", default=None, help="output dir (default: <run>/eval_<checkpoint>)")
    d.add_argument("--samples", type=int_flag("count"), default=None,
                   help="test samples (default: the config's eval.samples)")
    d.add_argument("--rho-iters", type=int_flag("power_iters"), default=None,
                   help="power iterations for rho (default: config)")
    d.add_argument("--no-mlflow", action="store_true", help="do not log to the run's MLflow entry")
    d.add_argument("--difficulty", default=None, metavar="LO..HI",
                   help="chains task: a fresh test set over difficulties LO..HI (--samples problems, spread evenly); "
                        "writes difficulty_depth.{md,json,png}: accuracy per difficulty and depth")
    d.add_argument("--threshold", type=float_flag(0.0, 1.0, lo_open=True), default=0.9, help="--difficulty: report the first depth reaching it")
    add_exit_args(d)
    d.add_argument("--states", type=int_flag("count", lo=0), default=0, metavar="N",
                   help="also plot the hidden-state trajectories of N examples on their first two principal "
                        "components over max(depths) iterations (states_pca.png/.json)")
    add_lm_parser(sub)
    c = sub.add_parser("compare", help="one plot and one table of accuracy, ||dh|| and rho against depth for "
                                       "several runs (runs with the same label are one group: mean and range)")
    c.add_argument("runs", nargs="+", help="run dirs, eval dirs or depth_scaling.json files")
    c.add_argument("--out", required=True, help="output dir: compare.png, compare.json, compare.md")
    c.add_argument("--labels", default=None, help="comma-separated label per run (default: the run's name)")
    c.add_argument("--title", default="", help="plot title")
    return p


def add_lm_parser(sub) -> None:
    from stars_scale.cli.flags import float_flag, int_flag
    from stars_scale.generate.exit_rules import ADAPTIVE

    lm = sub.add_parser("lm", help="lm-evaluation-harness tasks against loop depth (needs the eval extra)")
    lm.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir or converted dir")
    lm.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    lm.add_argument("--depths", type=parse_depths, default="4,8,16,32",
                    help="fixed depths (with --exit: the max depth of each run)")
    lm.add_argument("--exit", default=None, choices=ADAPTIVE, help="per-token exit rule")
    lm.add_argument("--tol", type=float_flag(0.0, lo_open=True), default=None, help="exit-rule tolerance")
    lm.add_argument("--limit", type=float_flag(0.0, lo_open=True), default=None,
                    help="examples per task (or a fraction < 1)")
    lm.add_argument("--include-path", default=None, help="a directory of extra task YAMLs (local datasets)")
    lm.add_argument("--num-fewshot", type=int_flag("count", lo=0), default=None)
    lm.add_argument("--batch-size", type=int_flag("count"), default=16)
    lm.add_argument("--cache", default="full", choices=("full", "shared"), help="KV cache scheme for generation")
    lm.add_argument("--cache-slots", type=int_flag("depth"), default=4)
    lm.add_argument("--tokenizer", default=None, help="tokenizer.json (default: next to the weights or the data)")
    lm.add_argument("--out", default=None, help="output dir (default: <run>/eval_<checkpoint>, or <dir>/eval)")
    lm.add_argument("--no-mlflow", action="store_true", help="do not log to the run's MLflow entry")
    lm.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def add_exit_args(d: argparse.ArgumentParser) -> None:
    """`depth --exit RULES --tol T`: greedy generation under per-token exit rules (arithmetic, chains)."""
    from stars_scale.cli.flags import int_flag
    from stars_scale.generate.exit_rules import ADAPTIVE

    d.add_argument("--exit", default=None,
                   help=f"comma-separated exit rules to evaluate next to the fixed depths: {','.join(ADAPTIVE)} "
                        "(or all); reports accuracy and mean/p99 loops per generated token")
    d.add_argument("--tol", default=None, help="tolerance for every rule, or RULE=T,... (repeat a rule to sweep)")
    d.add_argument("--max-depth", type=int_flag("depth"), default=None,
                   help="most loops per token (default: max of --depths)")
    d.add_argument("--exit-rho-iters", type=int_flag("power_iters", lo=0), default=0,
                   help="contraction: power-iteration steps for rho-hat")
    d.add_argument("--cache", default="full", choices=("full", "shared"), help="KV cache scheme for --exit")
    d.add_argument("--cache-slots", type=int_flag("depth"), default=4, help="shared cache slots")
    d.add_argument("--warm-start", action="store_true", help="continuous-depth warm start under --exit")


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _main(argv))  # a bad flag is one line and exit 2, like any UserError


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        return run_cli(lambda: _compare(args))

    def body() -> int:
        if args.command == "lm":
            return _lm(args)
        import torch

        from stars_scale.config import load_config
        from stars_scale.data.sources import build_eval_batch
        from stars_scale.errors import UserError
        from stars_scale.eval.depth_scaling import depth_sweep, write_depth_scaling
        from stars_scale.model.looped import LoopedLM
        from stars_scale import checkpoint as ckpt
        from stars_scale.optional import check_run_dependencies

        depths = args.depths  # parsed and bounded by parse_depths before anything is imported
        path = ckpt.resolve_checkpoint(args.checkpoint)
        cfg_path = path / "config.yaml"
        if not cfg_path.is_file():
            raise UserError(f"{cfg_path}: missing from the checkpoint")
        cfg = load_config(cfg_path)
        check_run_dependencies(cfg)  # e.g. the shards of its eval data need webdataset
        state = ckpt.load_state(path)
        model = LoopedLM(cfg.model)
        try:
            model.load_state_dict(ckpt.read_model_state(path, cfg.model))  # DCP shards of any layout, or model.pt
        except RuntimeError as e:
            raise UserError(f"{path}: the weights do not match the checkpoint's config ({e})") from None
        samples = args.samples or cfg.eval.samples
        if samples < 1:
            raise UserError(f"--samples: must be >= 1, got {samples}")
        if args.difficulty:
            batch, has_acc = _difficulty_batch(cfg, args.difficulty, samples, args.threshold), True
        else:
            batch, has_acc = build_eval_batch(cfg, samples)
        groups = batch.get("difficulty")
        with torch.no_grad():
            results = depth_sweep(model, batch, depths, rho_iters=args.rho_iters or cfg.eval.rho_iters,
                                  batch_size=cfg.eval.batch_size, seed=cfg.seed, has_accuracy=has_acc,
                                  groups=groups)
        results["step"] = state.get("step")
        results["checkpoint"] = str(path)
        out = Path(args.out) if args.out else path.parent.parent / f"eval_{path.name}"
        title = f"{path.parent.parent.name} @ {path.name}"
        extra = _exit_rules(args, cfg, model, batch, has_acc, results, out, title) if args.exit else []
        if groups is not None:
            from stars_scale.eval.difficulty import write_difficulty

            extra += list(write_difficulty(results, out, title=title, threshold=args.threshold,
                                           train_range=tuple(cfg.data.difficulty)))
            print((out / "difficulty_depth.md").read_text(), end="", file=sys.stderr)
        if args.states:
            extra += _state_pca(model, batch, max(depths), args.states, cfg, has_acc, out, title)
        jpath, ppath = write_depth_scaling(results, out, title=title)
        run_id = state.get("mlflow_run_id")
        if run_id and cfg.tracking.mlflow and not args.no_mlflow:
            _log_to_run(cfg, run_id, results, jpath, ppath, extra)
        keys = ("depths", "accuracy", "loss", "rho", "delta_h", "accuracy_by_group", "exit_rules")
        print(json.dumps({k: results[k] for k in keys if k in results}))
        return 0

    return run_cli(body)


def _difficulty_batch(cfg, text: str, samples: int, threshold: float) -> dict:
    """--difficulty LO..HI: `samples` fresh chains test problems spread evenly over LO..HI."""
    from stars_scale.config import chains_room
    from stars_scale.data.chains import parse_difficulty
    from stars_scale.data.sources import build_task
    from stars_scale.errors import UserError

    if cfg.data.kind != "chains":
        raise UserError(f"--difficulty: needs a model trained on the chains task (data.kind: chains), "
                        f"not {cfg.data.kind}")
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold: expected a fraction in (0, 1], got {threshold}")
    try:
        lo, hi = parse_difficulty(text)
    except ValueError as e:
        raise UserError(f"--difficulty: {e}") from None
    need = chains_room(hi, cfg.data.chains, cfg.data.matched)
    if need > cfg.data.statements:
        raise UserError(f"--difficulty: {hi} lookups and {cfg.data.chains - 1} distractor chain(s) need {need} "
                        f"statements; the model's problems have data.statements={cfg.data.statements}")
    if samples < hi - lo + 1:
        raise UserError(f"--samples: {samples} is fewer than one problem per difficulty ({hi - lo + 1})")
    return build_task(cfg, test_difficulty=(lo, hi), test_size=samples).test_batch()


def _lm(args) -> int:
    """`stars-eval lm`: lm-eval once per depth -> lm_depth_scaling.json + .png (+ MLflow)."""
    from stars_scale.errors import UserError
    from stars_scale.generate.load import load_codec, load_model
    from stars_scale.utils import atomic_write_json

    from stars_scale.eval.lm_harness import lm_depth_scaling, plot_lm_depth_scaling  # UserError if missing

    depths = args.depths
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks: expected comma-separated lm-eval task names")
    if args.exit and args.tol is None:
        raise UserError(f"--exit {args.exit}: needs --tol")
    if args.include_path and not Path(args.include_path).is_dir():
        raise UserError(f"--include-path {args.include_path}: not a directory")
    from stars_scale.cli.generate import resolve_device

    run, model, wdir = load_model(args.checkpoint, resolve_device(args.device))
    codec = load_codec(run, wdir, args.tokenizer)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        table = lm_depth_scaling(model, run, codec, tasks, depths, exit=args.exit, tol=args.tol, limit=limit,
                                 include_path=args.include_path, batch_size=args.batch_size, cache=args.cache,
                                 cache_slots=args.cache_slots, num_fewshot=args.num_fewshot, seed=run.seed)
    except KeyError as e:  # lm-eval: an unknown task name
        raise UserError(f"--tasks: lm-eval does not know {e} (add its YAML directory with --include-path)") from None
    table["checkpoint"] = str(wdir)
    is_training_ckpt = (wdir / "model.pt").is_file() or (wdir / "dcp").is_dir()
    out = Path(args.out) if args.out else (wdir.parent.parent / f"eval_{wdir.name}" if is_training_ckpt
                                           else wdir / "eval")
    out.mkdir(parents=True, exist_ok=True)
    jpath, ppath = out / "lm_depth_scaling.json", out / "lm_depth_scaling.png"
    atomic_write_json(jpath, table)
    plot_lm_depth_scaling(table, ppath, title=f"{wdir.name}: lm-eval against depth")
    run_id = None
    if is_training_ckpt:
        from stars_scale import checkpoint as ckpt

        run_id = ckpt.load_state(wdir).get("mlflow_run_id")
    if run_id and run.tracking.mlflow and not args.no_mlflow:
        _log_lm_to_run(run, run_id, table, [jpath, ppath])
    print(json.dumps({k: table[k] for k in ("depths", "exit", "tasks", "mean_loops")}))
    return 0


def _log_lm_to_run(cfg, run_id: str, table: dict, files: list[Path]) -> None:
    tracker = _run_tracker(cfg, run_id)
    if tracker is None:
        return
    for i, d in enumerate(table["depths"]):
        m = {f"lm_{task}_{e['metric']}": e["scores"][i] for task, e in table["tasks"].items()}
        m["lm_mean_loops"] = table["mean_loops"][i]
        tracker.log_metrics(m, step=d)
    for p in files:
        tracker.log_artifact(p, "eval")
    tracker.close(status="FINISHED")


def _exit_rules(args, cfg, model, batch, has_acc: bool, results: dict, out: Path, title: str) -> list[Path]:
    """Evaluate --exit rules; adds results["exit_rules"] and writes test_time.{png,md}."""
    import torch

    from stars_scale.data import arithmetic, chains
    from stars_scale.data.sources import build_task
    from stars_scale.errors import UserError
    from stars_scale.eval.exit_accuracy import exit_rule_eval, format_table, parse_tols, plot_accuracy_vs_loops
    from stars_scale.generate.exit_rules import ADAPTIVE
    from stars_scale.utils import atomic_write_text

    if not has_acc or cfg.data.kind not in ("arithmetic", "chains"):
        raise UserError("--exit: needs a model trained on the arithmetic or chains task (exact-match answers); "
                        "for text benchmarks use `stars-eval lm --exit`")
    rules = list(ADAPTIVE) if args.exit == "all" else [r.strip() for r in args.exit.split(",")]
    for r in rules:
        if r not in ADAPTIVE:
            raise UserError(f"--exit: unknown rule {r!r} (expected {', '.join(ADAPTIVE)} or all)")
    if args.tol is None:
        raise UserError("--exit: needs --tol")
    settings = parse_tols(args.tol, rules)
    max_depth = args.max_depth or max(results["depths"])
    if max_depth < 1 or args.cache_slots < 1 or args.exit_rho_iters < 0:
        raise UserError("--max-depth and --cache-slots must be >= 1, --exit-rho-iters >= 0")
    with torch.no_grad():
        rows = exit_rule_eval(model, batch, build_task(cfg).prompt_len, settings, max_depth=max_depth,
                              eos_id=chains.EOS if cfg.data.kind == "chains" else arithmetic.EOS,
                              cache=args.cache, cache_slots=args.cache_slots, rho_iters=args.exit_rho_iters,
                              warm_start=args.warm_start, batch_size=cfg.eval.batch_size,
                              groups=batch.get("difficulty"))
    results["exit_rules"] = rows
    results["exit_max_depth"] = max_depth
    out.mkdir(parents=True, exist_ok=True)
    png, md = out / "test_time.png", out / "test_time.md"
    plot_accuracy_vs_loops(results, rows, png, title)
    table = format_table(results, rows)
    atomic_write_text(md, table + "\n")
    print(table, file=sys.stderr)
    return [png, md]


def _state_pca(model, batch, depth: int, examples: int, cfg, has_acc: bool, out: Path, title: str) -> list[Path]:
    """--states N: the PCA of N examples' loop-state trajectories -> states_pca.{json,png}."""
    import torch

    from stars_scale.eval.trajectories import arithmetic_titles, state_pca, write_state_pca

    examples = min(examples, batch["input_ids"].shape[0])
    titles = arithmetic_titles(batch, examples) if cfg.data.kind == "arithmetic" else None
    with torch.no_grad():
        res = state_pca(model, batch, depth, examples=examples, seed=cfg.seed, has_accuracy=has_acc, titles=titles)
    return list(write_state_pca(res, out, title=title))


def _compare(args) -> int:
    from stars_scale.eval.compare import group_runs, write_compare

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    paths = write_compare(group_runs(args.runs, labels), Path(args.out), args.title)
    print(paths["md"].read_text(), end="")
    print(f"wrote {paths['png']}, {paths['json']}, {paths['md']}", file=sys.stderr)
    return 0


def _run_tracker(cfg, run_id: str):
    """The checkpoint's MLflow run, or None (with a warning) when it cannot be reached."""
    import warnings

    try:
        from stars_scale.tracking.mlflow_tracker import MlflowTracker, default_tracking_uri

        return MlflowTracker(default_tracking_uri(cfg.tracking.tracking_uri), cfg.tracking.experiment,
                             run_id=run_id)
    except Exception as e:
        warnings.warn(f"MLflow run {run_id} not reachable ({type(e).__name__}: {e}); results are only on disk")
        return None


def _log_to_run(cfg, run_id: str, results: dict, jpath: Path, ppath: Path, extra: list[Path] = ()) -> None:
    tracker = _run_tracker(cfg, run_id)
    if tracker is None:
        return
    for i, d in enumerate(results["depths"]):
        m = {"eval_loss": results["loss"][i], "eval_rho": results["rho"][i], "eval_delta_h": results["delta_h"][i]}
        if results["accuracy"] is not None:
            m["eval_accuracy"] = results["accuracy"][i]
        for g, acc in results.get("accuracy_by_group", {}).items():
            m[f"eval_accuracy_difficulty_{g}"] = acc[i]
        tracker.log_metrics(m, step=d)
    for row in results.get("exit_rules", []):
        name = f"exit_{row['rule']}_{row['tol']:g}"
        tracker.log_metrics({f"{name}_accuracy": row["accuracy"], f"{name}_mean_loops": row["mean_loops"],
                             f"{name}_p99_loops": row["p99_loops"]}, step=results["exit_max_depth"])
    for p in (jpath, ppath, *extra):
        tracker.log_artifact(p, "eval")
    tracker.close(status="FINISHED")


if __name__ == "__main__":
    sys.exit(main())
