"""How many power iterations the STARS estimate needs on a trained model: ρ̂ against iterations.

    python bench/estimator_convergence.py RUN_OR_CHECKPOINT [--depth 4] [--iters 1,2,3,5,10,20,40]
                                          [--samples 128] [--draws 3] [--methods vjp,jvp]

Runs the loop `--depth` times on `--samples` held-out problems of the run's task, then estimates
the spectral radius of the core map at that end state with the training estimator
(`stars.jacobian.spectral_penalty`, no graph) for each number of iterations, from `--draws`
random starting directions. One iteration (the paper's penalty) reads ‖Jᵀv‖ for a random unit v:
an average gain over directions (a Hutchinson estimate of ‖J‖_F/√n), not the top eigenvalue; the
table shows how far that is from the converged ρ̂, i.e. what the penalty does not see.
"""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run directory, one of its checkpoints or a converted model")
    ap.add_argument("--depth", type=int, default=4, help="loop iterations before the estimate")
    ap.add_argument("--iters", default="1,2,3,5,10,20,40")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--draws", type=int, default=3, help="random starting directions per setting")
    ap.add_argument("--methods", default="vjp,jvp")
    args = ap.parse_args(argv)

    from stars_scale.errors import run_cli
    return run_cli(lambda: _run(args))


def _run(args) -> int:
    from stars_scale.data.sources import build_eval_batch
    from stars_scale.errors import UserError
    from stars_scale.generate.load import load_model
    from stars_scale.stars.jacobian import METHODS, spectral_penalty

    try:
        iters = [int(x) for x in args.iters.split(",")]
    except ValueError:
        raise UserError(f"--iters: expected comma-separated integers, got {args.iters!r}") from None
    methods = args.methods.split(",")
    if any(m not in METHODS for m in methods):
        raise UserError(f"--methods: expected a comma-separated subset of {','.join(METHODS)}, got {args.methods!r}")
    if min(iters) < 1 or args.depth < 1 or args.samples < 1 or args.draws < 1:
        raise UserError("--iters, --depth, --samples and --draws must be >= 1")
    cfg, model, path = load_model(args.run)  # a run dir, a checkpoint or a converted model, eval mode
    batch, _ = build_eval_batch(cfg, args.samples)
    with torch.no_grad():
        e = model.encode(batch["input_ids"])
        s = model.init_state(e, torch.Generator().manual_seed(0))
        for _ in range(args.depth):
            s = model.core_step(s, e)

    def fn(h: torch.Tensor) -> torch.Tensor:
        return model.core_step(h, e)

    print(f"{path}: end state after {args.depth} iterations, {s.shape[0]} problems; "
          f"rho-hat per power iteration count ({args.draws} random starts: mean [min, max])")
    print("| method | " + " | ".join(f"{k} it." for k in iters) + " |")
    print("|---|" + "---|" * len(iters))
    for method in methods:
        cells = []
        for k in iters:
            r = [float(spectral_penalty(fn, s, method, k, create_graph=False,
                                        generator=torch.Generator().manual_seed(d)).rho) for d in range(args.draws)]
            cells.append(f"{sum(r) / len(r):.3f} [{min(r):.3f}, {max(r):.3f}]")
        print(f"| {method} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
