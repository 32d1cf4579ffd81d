"""`stars-generate`: text in, text out, at a fixed or adaptive loop depth.

    stars-generate --checkpoint RUN --prompt '123+456=' --depth 8
    stars-generate --checkpoint DIR --prompts prompts.txt --exit contraction --tol 1e-3 --max-depth 32

One prompt per line in --prompts FILE. Prints each completion (one line per prompt; with --json
one JSON object per prompt with the loops each token used).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stars_scale.errors import run_cli


def add_generation_args(p: argparse.ArgumentParser, depth_required: bool = False) -> None:
    """Depth / exit-rule / cache options shared by stars-generate and stars-eval."""
    from stars_scale.cli.flags import float_flag, int_flag
    from stars_scale.generate.exit_rules import RULES

    p.add_argument("--depth", type=int_flag("depth"), default=None,
                   help="fixed loop depth (default: the model's eval depth)")
    p.add_argument("--exit", default=None, choices=RULES, help="per-token exit rule (with --tol)")
    p.add_argument("--tol", type=float_flag(0.0, lo_open=True), default=None, help="exit-rule tolerance")
    p.add_argument("--max-depth", type=int_flag("depth"), default=64, help="most loops per token under an exit rule")
    p.add_argument("--rho-iters", type=int_flag("power_iters", lo=0), default=0,
                   help="contraction: power-iteration steps for rho-hat per loop (0: observed ratio only)")
    p.add_argument("--cache", default="full", choices=("full", "shared", "none"), help="KV cache scheme")
    p.add_argument("--cache-slots", type=int_flag("depth"), default=4,
                   help="shared cache: slots k (iteration i uses i mod k)")
    p.add_argument("--warm-start", action="store_true",
                   help="continuous depth: start each token's loop from the previous token's final state")


def options_from_args(args, run, max_new_tokens: int, eos_id, *, temperature=0.0, top_k=None, top_p=None,
                      seed=0):
    from stars_scale.errors import UserError
    from stars_scale.generate import GenerateOptions, make_rule
    from stars_scale.generate.load import default_depth

    if args.exit not in (None, "fixed") and args.depth is not None:
        raise UserError("--depth and --exit are exclusive (an exit rule stops at --max-depth at most)")
    if args.exit not in (None, "fixed") and args.tol is None:
        raise UserError(f"--exit {args.exit}: needs --tol")
    depth = args.depth if args.depth is not None else default_depth(run)
    opts = GenerateOptions(max_new_tokens=max_new_tokens, depth=depth, exit=args.exit or "fixed", tol=args.tol,
                           max_depth=args.max_depth, rho_iters=args.rho_iters, cache=args.cache,
                           cache_slots=args.cache_slots, warm_start=args.warm_start, temperature=temperature,
                           top_k=top_k, top_p=top_p, eos_id=eos_id, seed=seed)
    if opts.exit != "fixed":
        try:
            make_rule(opts.exit, tol=opts.tol)  # the rule's own bounds on its tolerance
        except ValueError as e:
            raise UserError(f"--tol: {e}") from None
    try:
        opts.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    return opts


def resolve_device(name: str | None) -> str:
    """cpu, cuda or cuda:N that exists here (a model on `meta` or an unsupported backend such as
    xpu would only fail later, inside the forward)."""
    import torch

    from stars_scale.errors import UserError

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise UserError(f"--device: {name[:40]!r} is not a device this runs on (cpu, cuda, cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def build_parser() -> argparse.ArgumentParser:
    from stars_scale.cli.flags import OneLineParser, float_flag, int_flag

    p = OneLineParser(prog="stars-generate", description="Generate text with a looped LM.")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir (latest checkpoint) or converted dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="a file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int_flag("width"), default=None,
                   help="default: up to the model's max_seq_len (arithmetic: the answer's length)")
    add_generation_args(p)
    p.add_argument("--temperature", type=float_flag(0.0), default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int_flag("width"), default=None)
    p.add_argument("--top-p", type=float_flag(0.0, 1.0, lo_open=True), default=None)
    p.add_argument("--seed", type=int_flag("seed"), default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: next to the weights or the data)")
    p.add_argument("--batch-size", type=int_flag("count"), default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt, with loops per token")
    return p


def _read_prompts(args) -> list[str]:
    from stars_scale.errors import UserError

    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {path}: cannot read ({e})") from None
    prompts = [ln for ln in lines if ln.strip()]
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts (expected one per line)")
    return prompts


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _main(argv))  # a bad flag is one line and exit 2, like any UserError


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        import torch

        from stars_scale.errors import UserError
        from stars_scale.generate import generate_many
        from stars_scale.generate.load import load_codec, load_model

        prompts = _read_prompts(args)
        run, model, wdir = load_model(args.checkpoint, resolve_device(args.device))
        codec = load_codec(run, wdir, args.tokenizer)
        ids = [codec.encode(p) for p in prompts]
        vocab, ctx = run.model.vocab_size, run.model.max_seq_len
        for i, (p, t) in enumerate(zip(prompts, ids)):
            shown = repr(p) if len(p) <= 40 else f"{i + 1} ({len(p)} characters)"
            if not t:
                raise UserError(f"prompt {shown}: encodes to no tokens")
            if max(t) >= vocab:
                raise UserError(f"prompt {shown}: token id {max(t)} from {codec.name} is outside the model's "
                                f"vocabulary of {vocab} (a tokenizer for another model?)")
            if len(t) > ctx:
                raise UserError(f"prompt {shown}: {len(t)} tokens, longer than the model's context "
                                f"(model.max_seq_len {ctx})")
        longest = max(len(t) for t in ids)
        room = ctx - longest + 1
        n_new = args.max_new_tokens if args.max_new_tokens is not None else room
        if n_new > room:
            raise UserError(f"--max-new-tokens: {n_new} does not fit: the longest prompt has {longest} tokens "
                            f"and model.max_seq_len is {ctx} (at most {room})")
        opts = options_from_args(args, run, n_new, codec.eos_id, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        with torch.no_grad():
            outs = generate_many(model, ids, opts, batch_size=args.batch_size)
        for p, (toks, loops) in zip(prompts, outs):
            text = codec.decode(toks)
            if args.json:
                print(json.dumps({"prompt": p, "completion": text, "tokens": toks, "loops": loops}))
            else:
                print(text)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
