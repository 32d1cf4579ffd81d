"""Data pipeline throughput: `stars-data prepare` in MB/s of text, and the loader alone in tokens/s.

    .venv/bin/python bench/loader.py                     # synthetic corpus, prepare + loader
    .venv/bin/python bench/loader.py --data DIR          # loader only, on an existing dataset

`prepare_mb_per_s` and `loader_tokens_per_s` are plain functions so other benchmarks (e.g. the
training step's tokens/s) can import them and print comparisons. Run it once: the machine is
shared, and the figures are for sizing, not for tests.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from stars_scale.data.loader import ShardSource
from stars_scale.data.prepare import PrepareOptions, PrepareResult, prepare
from stars_scale.data.tokenizer import train_bpe


def synthetic_corpus(directory: Path, megabytes: float, *, files: int = 8, seed: int = 0) -> Path:
    """Zipf-distributed made-up words in .jsonl documents of 50-2000 words (about `megabytes` MB)."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(20000)]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    directory.mkdir(parents=True, exist_ok=True)
    target = int(megabytes * 1e6 / files)
    for f in range(files):
        size = 0
        with open(directory / f"part-{f:03d}.jsonl", "w") as out:
            while size < target:
                words = rng.choices(vocab, weights, k=rng.randint(50, 2000))
                line = json.dumps({"text": " ".join(words) + "."}) + "\n"
                out.write(line)
                size += len(line)
    return directory


def prepare_mb_per_s(corpus: Path, tokenizer: Path, out: Path, *, seq_len: int = 1024, workers: int = 0) -> PrepareResult:
    """Run `prepare` once; the result carries text_bytes, seconds and mb_per_s."""
    return prepare(PrepareOptions(inputs=[str(corpus)], out=str(out), tokenizer=str(tokenizer), seq_len=seq_len,
                                  shard_size=4 * 10**6, workers=workers, overwrite=True, progress=False))


def loader_tokens_per_s(data_dir: str | Path, *, batch_size: int = 8, num_workers: int = 0, batches: int = 200,
                        warmup: int = 10, shuffle_buffer: int = 1024, seed: int = 0) -> float:
    """Input tokens per second delivered by `ShardSource.next_batch` alone (no model)."""
    src = ShardSource(str(data_dir), batch_size, dp_rank=0, dp_size=1, seed=seed, num_workers=num_workers,
                      shuffle_buffer=shuffle_buffer)
    for _ in range(warmup):  # worker start-up and shuffle-buffer fill are not steady state
        src.next_batch()
    start_tokens = src.tokens_seen
    t0 = time.perf_counter()
    for _ in range(batches):
        src.next_batch()
    seconds = time.perf_counter() - t0
    src.close()
    return (src.tokens_seen - start_tokens) / seconds


def train_step_tokens_per_s(config: str | Path, steps: int = 20, warmup: int = 3) -> tuple[float, int, int]:
    """Tokens/s the training step of `config` consumes (its sampled depths, regulariser on)."""
    import statistics

    import torch

    from stars_scale.config import load_config
    from stars_scale.data.sources import build_train_source
    from stars_scale.model.looped import LoopedLM
    from stars_scale.stars.depth import DepthSampler
    from stars_scale.parallel.optim import build_optimizer
    from stars_scale.stars.objective import forward_backward

    cfg = load_config(config, ["stars.warmup_steps=0"])
    torch.manual_seed(cfg.seed)
    model = LoopedLM(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    src = build_train_source(cfg)
    sampler = DepthSampler(cfg.depth, cfg.seed)
    rates = []
    for i in range(warmup + steps):
        batch = src.next_batch()
        t0 = time.perf_counter()
        forward_backward(model, batch, sampler.sample(i), cfg.stars, step=i, micro=0, seed=cfg.seed, loss_scale=1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            rates.append(batch["input_ids"].numel() / (time.perf_counter() - t0))
    return statistics.median(rates), cfg.data.batch_size, src.seq_len


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="an existing dataset directory (skips the corpus and prepare)")
    p.add_argument("--mb", type=float, default=32.0, help="synthetic corpus size in MB")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--workers", default="0,2", help="loader worker counts to measure, comma-separated")
    p.add_argument("--prepare-workers", type=int, default=0, help="0: one per core")
    p.add_argument("--vs-train", metavar="CONFIG", default=None,
                   help="also compare with the training step of CONFIG (e.g. configs/arith_tiny.yaml): the loader "
                        "reads that task as shards at that batch size")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="stars-bench-data-"))
    try:
        data = Path(args.data) if args.data else None
        if data is None:
            corpus = synthetic_corpus(tmp / "corpus", args.mb)
            sample = [json.loads(line)["text"] for line in open(corpus / "part-000.jsonl")][:200]
            tok = train_bpe(sample, args.vocab_size)
            tok.save(str(tmp / "tokenizer.json"))
            res = prepare_mb_per_s(corpus, tmp / "tokenizer.json", tmp / "ds", seq_len=args.seq_len,
                                   workers=args.prepare_workers)
            print(f"prepare: {res.text_bytes / 1e6:.1f} MB of text, {res.tokens} tokens in {res.seconds:.2f} s: "
                  f"{res.mb_per_s:.2f} MB/s ({res.tokens / res.seconds:,.0f} tokens/s)")
            data = tmp / "ds"
        for w in (int(x) for x in args.workers.split(",")):
            tps = loader_tokens_per_s(data, batch_size=args.batch_size, num_workers=w, batches=args.batches)
            print(f"loader: workers={w} batch={args.batch_size} seq_len={ShardSource(str(data), 1, dp_rank=0, dp_size=1, seed=0).seq_len}: "
                  f"{tps:,.0f} tokens/s")
        if args.vs_train:
            _compare_with_training(args.vs_train, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _compare_with_training(config: str, tmp: Path) -> None:
    import subprocess

    from stars_scale.config import load_config

    cfg = load_config(config)
    out = tmp / "arith"
    subprocess.run([sys.executable, "-m", "stars_scale.cli.data", "arithmetic", "--digits", str(cfg.data.digits),
                    "--samples", "200000", "--blocks-per-shard", "20000", "--out", str(out)], check=True,
                   capture_output=True)
    train_tps, batch, seq = train_step_tokens_per_s(config)
    for w in (0, 2):
        tps = loader_tokens_per_s(out, batch_size=batch, num_workers=w, batches=300)
        print(f"{config}: training step consumes {train_tps:,.0f} tokens/s (batch {batch}x{seq}); loader "
              f"(workers={w}) delivers {tps:,.0f} tokens/s = {tps / train_tps:.1f}x the step")


if __name__ == "__main__":
    sys.exit(main())
