"""Reading text corpora: `.txt` and `.jsonl` files, optionally gzip-compressed, as documents.

Inputs are files or directories (searched recursively); files are taken in sorted path order so
the document stream, and everything derived from it, is a pure function of the inputs.

A `.jsonl` line is one document (its `text_field`). A `.txt` file is one document by default
(`txt_docs="file"`); `"paragraph"` splits at blank lines and `"line"` makes every non-empty
line a document. A whole-file document larger than `max_doc_chars` is handed to the tokenizer
in pieces cut after a newline, so a 10 GB text dump never sits in memory at once.
"""
from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from stars_scale.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
TXT_DOCS = ("file", "paragraph", "line")


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for suf in SUFFIXES:
        if name.endswith(suf):
            return suf
    return None


def find_inputs(paths: list[str | Path]) -> list[Path]:
    """Expand files/directories into the sorted list of input files; refuse an empty result."""
    found: list[Path] = []
    if not paths:
        raise UserError("no inputs given: pass text files or directories")
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f) and
                           not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not files:
                raise UserError(f"{p}: no input files ({', '.join(SUFFIXES)}) in this directory")
            found.extend(files)
        elif p.is_file():
            if _kind(p) is None:
                raise UserError(f"{p}: unsupported input type (expected {', '.join(SUFFIXES)})")
            found.append(p)
        else:
            raise UserError(f"{p}: no such file or directory")
    return found


@dataclass
class Document:
    text: str
    source_bytes: int  # on-disk bytes consumed since the previous document (progress accounting)
    continues: bool = False  # True: a piece of a long document; the EOS follows its last piece


def _open_binary(path: Path) -> tuple[BinaryIO, BinaryIO]:
    raw = open(path, "rb")
    if path.name.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def _decode(data: bytes, path: Path, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def iter_documents(path: Path, *, text_field: str = "text", txt_docs: str = "file",
                   max_doc_chars: int = 1 << 20) -> Iterator[Document]:
    """Documents of one input file, in file order. Bad input raises UserError naming file:line."""
    if txt_docs not in TXT_DOCS:
        raise UserError(f"txt document mode {txt_docs!r}: expected one of {', '.join(TXT_DOCS)}")
    stream, raw = _open_binary(path)
    last = 0

    def consumed() -> int:
        nonlocal last
        pos = raw.tell()
        delta, last = pos - last, pos
        return delta

    try:
        with stream, raw:
            try:
                if _kind(path).startswith(".jsonl"):  # type: ignore[union-attr]
                    yield from _jsonl_docs(stream, path, text_field, consumed)
                else:
                    yield from _txt_docs(stream, path, txt_docs, max_doc_chars, consumed)
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise UserError(f"{path}: cannot read ({e})") from None
    except (OSError, EOFError) as e:  # closing a truncated gzip stream can fail too
        raise UserError(f"{path}: cannot read ({e})") from None


def _jsonl_docs(stream: BinaryIO, path: Path, text_field: str, consumed: Callable[[], int]) -> Iterator[Document]:
    for lineno, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        text = _decode(line, path, f":{lineno}")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise UserError(f"{path}:{lineno}: no {text_field!r} field (choose the field with --text-field)")
        value = obj[text_field]
        if not isinstance(value, str):
            raise UserError(f"{path}:{lineno}: field {text_field!r} should be a string, got {type(value).__name__}")
        if value:  # an empty document would add a lone EOS
            yield Document(value, consumed())


def _txt_docs(stream: BinaryIO, path: Path, mode: str, max_chars: int, consumed: Callable[[], int]) -> Iterator[Document]:
    reader = io.BufferedReader(stream) if not isinstance(stream, io.BufferedReader) else stream  # type: ignore[arg-type]
    if mode == "file":
        pending: list[str] = []
        size = 0
        split = False
        for lineno, line in enumerate(reader, start=1):
            pending.append(_decode(line, path, f":{lineno}"))
            size += len(line)
            if size >= max_chars:
                yield Document("".join(pending), consumed(), continues=True)
                pending, size, split = [], 0, True
        if pending or split:  # an empty file is no document; a split one still needs its end
            yield Document("".join(pending), consumed())
        return
    para: list[str] = []
    for lineno, line in enumerate(reader, start=1):
        text = _decode(line, path, f":{lineno}")
        if mode == "line":
            if text.strip():
                yield Document(text.rstrip("\r\n"), consumed())
            continue
        if text.strip():
            para.append(text)
        elif para:
            yield Document("".join(para).rstrip("\r\n"), consumed())
            para = []
    if para:
        yield Document("".join(para).rstrip("\r\n"), consumed())
