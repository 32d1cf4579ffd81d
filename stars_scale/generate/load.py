"""A trained or converted looped model and its prompt codec, ready to generate.

`load_model(path)` takes what `stars-eval` takes: a training checkpoint dir, a run dir (its
latest complete checkpoint) or a converted checkpoint (`stars-convert import` output).

`load_codec(run, ckpt_dir, tokenizer)` turns prompt text into token ids and back:
- an explicit `--tokenizer tokenizer.json` wins;
- else a `tokenizer.json` next to the weights, else the one stored with the training data
  (`data.path` / the first `data.mixture` entry: `stars-data prepare` copies it there);
- arithmetic models (data.kind arithmetic, or arithmetic shards) use the task's own format:
  the 15-symbol vocabulary, prompts written as the task writes them (`123+456=`), EOS = <eos>;
  chains models likewise (`ba c7 ab d? `: one character per token, whitespace ignored).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from stars_scale.errors import UserError


@dataclass
class Codec:
    name: str
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_id: Optional[int]


def arithmetic_codec() -> Codec:
    from stars_scale.data.arithmetic import EOS, VOCAB, decode_tokens

    index = {ch: i for i, ch in enumerate(VOCAB) if len(ch) == 1}

    def encode(text: str) -> list[int]:
        bad = sorted({ch for ch in text if ch not in index})
        if bad:
            raise UserError(f"prompt {text!r}: characters {bad} are not in the arithmetic vocabulary "
                            f"(digits, '+', '=', ' ')")
        return [index[ch] for ch in text]

    return Codec("arithmetic", encode, lambda ids: decode_tokens(ids), EOS)


def chains_codec() -> Codec:
    from stars_scale.data.chains import EOS, decode_tokens, encode_text

    def encode(text: str) -> list[int]:
        try:
            return encode_text(text)
        except ValueError as e:
            raise UserError(f"prompt {text!r}: {e}") from None

    return Codec("chains", encode, lambda ids: decode_tokens(ids), EOS)


def tokenizer_codec(path: Path) -> Codec:
    from stars_scale.data.tokenizer import find_eos, load_tokenizer

    tok = load_tokenizer(path)
    try:
        eos = find_eos(tok, path)
    except UserError:
        eos = None  # generation then stops at --max-new-tokens only
    return Codec(str(path), lambda text: tok.encode(text).ids, lambda ids: tok.decode(ids), eos)


def _data_dirs(run) -> list[Path]:
    d = run.data
    if d.kind != "shards":
        return []
    return [Path(d.path)] if d.path else [Path(m.path) for m in d.mixture]


def _shards_kind(data_dir: Path) -> str | None:
    try:
        manifest = json.loads((data_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest.get("kind")


def load_codec(run, ckpt_dir: Path, tokenizer: str | None = None) -> Codec:
    if tokenizer:
        return tokenizer_codec(Path(tokenizer))
    if (Path(ckpt_dir) / "tokenizer.json").is_file():
        return tokenizer_codec(Path(ckpt_dir) / "tokenizer.json")
    dirs = _data_dirs(run)
    kind = run.data.kind if run.data.kind != "shards" else (_shards_kind(dirs[0]) if dirs else None)
    if kind == "arithmetic":
        return arithmetic_codec()
    if kind == "chains":
        return chains_codec()
    for d in dirs:  # the tokenizer file the dataset's manifest lists, resolved inside the dataset
        from stars_scale.data.shards import MANIFEST, Manifest

        if not (d / MANIFEST).is_file():  # the data is not on this machine
            continue
        tpath = Manifest.load(d).tokenizer_path()
        if tpath is not None and tpath.is_file():
            return tokenizer_codec(tpath)
    raise UserError(f"{ckpt_dir}: no tokenizer found (none next to the weights or the training data); "
                    "pass --tokenizer PATH/tokenizer.json")


def load_model(path: str | Path, device: str = "cpu"):
    """(RunConfig, LoopedLM in eval mode, the resolved weights dir)."""
    from stars_scale.convert.checkpoint import load_converted_run, resolve_weights_dir
    from stars_scale.model.looped import LoopedLM

    d = resolve_weights_dir(path)
    run, sd = load_converted_run(d)
    model = LoopedLM(run.model)
    model.load_state_dict(sd)
    model = model.to(device).eval()
    check_attention(run, model, d)
    return run, model, d


def check_attention(run, model, where: Path) -> None:
    """The attention backend the config asks for can run where the model now is (`attention:
    flash` on a CPU device fails only inside the first forward otherwise)."""
    from stars_scale.model.attention import attention_plan

    p = next(model.parameters())
    try:
        attention_plan(p.device.type, p.dtype, 1, run.model.attention)
    except RuntimeError as e:
        raise UserError(f"{where}: model.attention: {e} (the model is on {p.device}, {p.dtype})") from None


def default_depth(run) -> int:
    """The depth a model was meant to run at: depth.eval_depth if set, else the training median."""
    from stars_scale.stars.depth import median_depth

    return int(median_depth(run.depth))
