"""Local Hugging Face `tokenizers` tokenizers: load one from `tokenizer.json`, find its EOS, train a BPE.

Nothing here touches the network: a tokenizer is always a local file, and the one used to
prepare a dataset is copied next to its shards (its sha256 is in the manifest), so decoding
and later checks never depend on the original path.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from stars_scale.errors import UserError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end_of_text|>")
DEFAULT_SPECIAL = "<|endoftext|>"


def load_tokenizer(path: str | Path):
    """Load a `tokenizer.json`; a missing or malformed file is a UserError naming it."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer {path}: no such file (expected a Hugging Face tokenizer.json)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception with a parse message
        raise UserError(f"tokenizer {path}: cannot load ({e})") from None


def tokenizer_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def find_eos(tok, path: str | Path, eos_token: str | None = None) -> int:
    """The id of the document separator: `eos_token` if given, else the first known EOS name."""
    if eos_token is not None:
        tid = tok.token_to_id(eos_token)
        if tid is None:
            raise UserError(f"tokenizer {path}: has no token {eos_token!r} (given as --eos-token)")
        return int(tid)
    for name in EOS_CANDIDATES:
        tid = tok.token_to_id(name)
        if tid is not None:
            return int(tid)
    raise UserError(f"tokenizer {path}: no end-of-document token among {', '.join(EOS_CANDIDATES)}; "
                    "name one with --eos-token")


def train_bpe(texts: Iterable[str], vocab_size: int, *, special_tokens: tuple[str, ...] = (DEFAULT_SPECIAL,),
              min_frequency: int = 2):
    """A byte-level BPE (GPT-2 style: lossless round trip of any UTF-8 text) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(special_tokens):
        raise UserError(f"vocab size {vocab_size}: a byte-level BPE needs at least {256 + len(special_tokens)} "
                        "(256 bytes plus the special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
