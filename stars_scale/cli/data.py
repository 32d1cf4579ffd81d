"""`stars-data`: build, train tokenizers for, and check pre-tokenised shard datasets.

  stars-data corpus --out DIR [--vocab-size 2048 --seq-len 128 | --text-only]   # Python's stdlib, shards
  stars-data train-tokenizer CORPUS... --vocab-size 512 --out tok.json
  stars-data prepare CORPUS... --tokenizer tok.json --seq-len 1024 --out DIR [--val-fraction 0.01]
  stars-data arithmetic --digits 3 --samples 100000 --out DIR
  stars-data chains --statements 12 --difficulty 1..6 --samples 100000 --out DIR
  stars-data inspect DIR [--verify] [--samples 2]

Bad input (missing files, corrupt shards, a manifest that disagrees with its shards) prints one
line `error: ...` naming the file and the problem, and exits with status 2. Heavy imports
(torch for the arithmetic task) happen only in the subcommand that needs them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stars_scale.errors import UserError, run_cli


def _size(text: str) -> int:
    from stars_scale.data.shards import parse_size

    try:
        return parse_size(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _difficulty(text: str) -> tuple[int, int]:
    from stars_scale.data.chains import parse_difficulty

    try:
        return parse_difficulty(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stars-data", description="Pre-tokenised webdataset shards for stars_scale.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("corpus", help="write this Python's standard-library sources as a text corpus with a "
                                      "deterministic train/val split (nothing is downloaded)")
    c.add_argument("--out", required=True, help="corpus directory to create (corpus.jsonl, train.jsonl, val.jsonl, "
                                                "corpus.json)")
    c.add_argument("--max-bytes", type=_size, default="4MB", help="cap on the corpus size (default 4MB)")
    c.add_argument("--val-fraction", type=float, default=0.1, help="fraction of documents in the val split")
    c.add_argument("--root", default=None, help="stdlib directory (default: this interpreter's)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing corpus in --out")
    c.add_argument("--text-only", action="store_true", help="write the text only (no tokenizer, no shards)")
    c.add_argument("--vocab-size", type=int, default=2048, help="byte-level BPE trained on train.jsonl")
    c.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence of the shards")
    c.add_argument("--shard-size", type=_size, default="1MB", help="target shard size")
    c.add_argument("--workers", type=int, default=0, help="tokeniser processes (0: one per core)")

    t = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on local text files")
    t.add_argument("inputs", nargs="+", help="text files or directories (.txt, .jsonl, optionally .gz)")
    t.add_argument("--out", required=True, help="where to write tokenizer.json")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--special-token", action="append", default=None,
                   help="special tokens (repeatable; default <|endoftext|>, the EOS)")
    t.add_argument("--text-field", default="text", help="field holding the text in .jsonl lines")
    t.add_argument("--txt-docs", choices=("file", "paragraph", "line"), default="file",
                   help="what one document of a .txt file is")

    r = sub.add_parser("prepare", help="tokenise text into packed blocks and write shards + manifest")
    r.add_argument("inputs", nargs="+", help="text files or directories (.txt, .jsonl, optionally .gz)")
    r.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer.json")
    r.add_argument("--out", required=True, help="dataset directory to create")
    r.add_argument("--seq-len", type=int, default=1024, help="tokens per training sequence (blocks hold seq_len+1)")
    r.add_argument("--shard-size", type=_size, default="256MB", help="target shard size (e.g. 64MB, 1GiB)")
    r.add_argument("--blocks-per-shard", type=int, default=None, help="exact blocks per shard (overrides --shard-size)")
    r.add_argument("--val-fraction", type=float, default=0.0, help="fraction of documents for the val split")
    r.add_argument("--text-field", default="text", help="field holding the text in .jsonl lines")
    r.add_argument("--txt-docs", choices=("file", "paragraph", "line"), default="file",
                   help="what one document of a .txt file is (EOS follows every document)")
    r.add_argument("--eos-token", default=None, help="the document separator token (default: found in the tokenizer)")
    r.add_argument("--workers", type=int, default=0, help="tokeniser processes (0: one per core)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    a = sub.add_parser("arithmetic", help="write the n-digit addition task as shards")
    a.add_argument("--out", required=True)
    a.add_argument("--digits", type=int, default=3)
    a.add_argument("--samples", type=int, default=100_000, help="training problems")
    a.add_argument("--test-size", type=int, default=512, help="problems in the val split (the task's test set)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--no-reverse", action="store_true", help="write answers most significant digit first")
    a.add_argument("--shard-size", type=_size, default="64MB")
    a.add_argument("--blocks-per-shard", type=int, default=None)
    a.add_argument("--overwrite", action="store_true")

    c = sub.add_parser("chains", help="write the variable-binding chains task as shards")
    c.add_argument("--out", required=True)
    c.add_argument("--statements", type=int, default=12, help="binding statements per problem")
    c.add_argument("--variables", type=int, default=16, help="variable names (the first V letters)")
    c.add_argument("--difficulty", type=_difficulty, default=(1, 6), help="training lookups LO..HI")
    c.add_argument("--test-difficulty", type=_difficulty, default=None, help="val-split lookups LO..HI "
                                                                             "(default: --difficulty)")
    c.add_argument("--chains", type=int, default=3, help="chains per problem (distinct root digits)")
    c.add_argument("--order", choices=("program", "shuffled"), default="program",
                   help="program: every variable bound before it is referenced; shuffled: any order")
    c.add_argument("--value-first", action="store_true", help="statements written <value><variable>")
    c.add_argument("--names", choices=("random", "slot"), default="random",
                   help="slot: statement s binds the s-th letter (a lookup is by position)")
    c.add_argument("--matched", action="store_true",
                   help="every chain as long as the query's (needs --statements >= chains x difficulty)")
    c.add_argument("--samples", type=int, default=100_000, help="training problems")
    c.add_argument("--test-size", type=int, default=512, help="problems in the val split (the task's test set)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--shard-size", type=_size, default="64MB")
    c.add_argument("--blocks-per-shard", type=int, default=None)
    c.add_argument("--overwrite", action="store_true")

    i = sub.add_parser("inspect", help="summarise a dataset, decode samples, optionally verify every shard")
    i.add_argument("directory")
    i.add_argument("--samples", type=int, default=2, help="blocks to decode and print")
    i.add_argument("--split", default="train", choices=("train", "val"))
    i.add_argument("--chars", type=int, default=400, help="characters of each decoded sample to print")
    i.add_argument("--verify", action="store_true", help="read and check every shard against the manifest")
    return p


def _corpus(args) -> int:
    from stars_scale.data.corpus import CorpusOptions, write_corpus

    r = write_corpus(CorpusOptions(out=args.out, root=args.root, max_bytes=args.max_bytes,
                                   val_fraction=args.val_fraction, overwrite=args.overwrite,
                                   vocab_size=None if args.text_only else args.vocab_size, seq_len=args.seq_len,
                                   shard_size=args.shard_size, workers=args.workers))
    print(f"wrote {r.out}: Python {r.python} standard library ({r.root}), {r.documents} files; "
          f"train {r.train_documents} files {r.train_bytes / 1e6:.2f} MB, val {r.val_documents} files "
          f"{r.val_bytes / 1e6:.2f} MB")
    if r.tokens:
        print(f"wrote {r.out / 'tokenizer.json'} (byte-level BPE, {args.vocab_size} tokens, trained on train.jsonl) "
              f"and {r.out / 'shards'}: seq_len {args.seq_len}, " +
              ", ".join(f"{k} {v} tokens" for k, v in r.tokens.items()))
    return 0


def _train_tokenizer(args) -> int:
    from stars_scale.data.text import find_inputs, iter_documents
    from stars_scale.data.tokenizer import DEFAULT_SPECIAL, train_bpe
    from stars_scale.utils import atomic_write

    files = find_inputs(args.inputs)

    def texts():
        for f in files:
            for doc in iter_documents(f, text_field=args.text_field, txt_docs=args.txt_docs):
                yield doc.text

    specials = tuple(args.special_token or (DEFAULT_SPECIAL,))
    tok = train_bpe(texts(), args.vocab_size, special_tokens=specials, min_frequency=args.min_frequency)
    atomic_write(Path(args.out), lambda p: tok.save(str(p)))
    print(f"wrote {args.out}: byte-level BPE, {tok.get_vocab_size()} tokens, trained on {len(files)} file(s)")
    return 0


def _prepare(args) -> int:
    from stars_scale.data.prepare import PrepareOptions, prepare

    res = prepare(PrepareOptions(
        inputs=args.inputs, out=args.out, tokenizer=args.tokenizer, seq_len=args.seq_len, shard_size=args.shard_size,
        blocks_per_shard=args.blocks_per_shard, val_fraction=args.val_fraction, text_field=args.text_field,
        txt_docs=args.txt_docs, eos_token=args.eos_token, workers=args.workers, overwrite=args.overwrite,
        progress=False if args.no_progress else None))
    shards = ", ".join(f"{n} {k}" for k, n in res.shards.items())
    print(f"wrote {res.out}: {res.documents} documents, {res.tokens} tokens, {shards} shard(s); "
          f"{res.text_bytes / 1e6:.2f} MB of text in {res.seconds:.2f} s ({res.mb_per_s:.2f} MB/s)")
    return 0


def _arithmetic(args) -> int:
    from stars_scale.data.arithmetic_shards import ArithmeticOptions, write_arithmetic

    m = write_arithmetic(ArithmeticOptions(
        out=args.out, digits=args.digits, samples=args.samples, test_size=args.test_size, seed=args.seed,
        reverse_answer=not args.no_reverse, shard_size=args.shard_size, blocks_per_shard=args.blocks_per_shard,
        overwrite=args.overwrite))
    parts = ", ".join(f"{k}: {v.blocks} problems in {len(v.shards)} shard(s)" for k, v in m.splits.items())
    print(f"wrote {args.out}: {args.digits}-digit addition, seq_len {m.seq_len}; {parts}")
    return 0


def _chains(args) -> int:
    from stars_scale.data.arithmetic_shards import ChainsOptions, write_chains

    m = write_chains(ChainsOptions(
        out=args.out, statements=args.statements, variables=args.variables, difficulty=args.difficulty,
        test_difficulty=args.test_difficulty or args.difficulty, chains=args.chains, order=args.order,
        value_first=args.value_first, names=args.names, matched=args.matched, samples=args.samples,
        test_size=args.test_size, seed=args.seed, shard_size=args.shard_size,
        blocks_per_shard=args.blocks_per_shard,
        overwrite=args.overwrite))
    parts = ", ".join(f"{k}: {v.blocks} problems in {len(v.shards)} shard(s)" for k, v in m.splits.items())
    lo, hi = args.difficulty
    print(f"wrote {args.out}: variable-binding chains, {args.statements} statements, difficulty {lo}..{hi}, "
          f"seq_len {m.seq_len}; {parts}")
    return 0


def _inspect(args) -> int:
    from stars_scale.data import shards as fmt
    from stars_scale.data.verify import first_blocks, verify_dataset

    if args.verify:
        m = verify_dataset(args.directory)
    else:
        m = fmt.Manifest.load(args.directory)
    tok = m.tokenizer
    print(f"dataset {args.directory}: {m.kind}, seq_len {m.seq_len} (blocks of {m.block_len}), {m.dtype}, "
          f"vocab {m.vocab_size}, eos id {m.eos_id}, loss mask {'yes' if m.has_mask else 'no'}")
    print(f"tokenizer: {tok.get('file') or tok.get('name')} sha256 {str(tok.get('sha256'))[:16]}…; "
          f"total tokens {m.total_tokens}")
    for name, s in m.splits.items():
        print(f"  {name}: {len(s.shards)} shard(s), {s.blocks} blocks, {s.tokens} tokens, "
              f"{s.padding_tokens} padding, {s.documents} documents")
    if args.samples > 0 and args.split in m.splits and m.splits[args.split].shards:
        decode = _decoder(m)
        for b in first_blocks(m, args.split, args.samples):
            text = decode(b.tokens.tolist())
            if len(text) > args.chars:
                text = text[: args.chars] + "…"
            answer = ""
            if b.mask is not None:
                answer = f"  [loss on {int(b.mask.sum())} positions: {decode(b.tokens[1:][b.mask.astype(bool)].tolist())!r}]"
            print(f"--- {args.split} sample {b.key}:{answer}\n{text}")
    if args.verify:
        n = sum(len(s.shards) for s in m.splits.values())
        print(f"verified {n} shard(s): readable, expected members, block shape and dtype, counts and checksums "
              f"match the manifest")
    return 0


def _decoder(m):
    if m.kind == "arithmetic":
        from stars_scale.data.arithmetic import decode_tokens

        return decode_tokens
    if m.kind == "chains":
        from stars_scale.data.chains import decode_tokens

        return decode_tokens
    from stars_scale.data.tokenizer import load_tokenizer

    tok = load_tokenizer(m.tokenizer_path())
    return lambda ids: tok.decode(ids, skip_special_tokens=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"corpus": _corpus, "train-tokenizer": _train_tokenizer, "prepare": _prepare, "arithmetic": _arithmetic,
                "chains": _chains, "inspect": _inspect}
    return run_cli(lambda: handlers[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
