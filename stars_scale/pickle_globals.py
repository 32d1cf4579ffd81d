"""The globals (classes, functions) a pickle file references, read without unpickling anything.

Used to name what a refused checkpoint file holds: `pickletools.genops` walks the opcodes; GLOBAL
carries "module name", STACK_GLOBAL takes the two strings pushed before it (directly or through the
memo). A torch zip archive is read at its `*/data.pkl`; the legacy torch format is a few pickles
back to back (then raw storage bytes, where the walk stops).
"""
from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET = {"GET", "BINGET", "LONG_BINGET"}


def _walk(stream: io.BufferedIOBase, found: list[str]) -> None:
    memo: dict[int, object] = {}
    recent: list[object] = []  # the values pushed last (strings, or None for anything else)
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in _STRINGS:
            recent.append(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in _PUT:
            memo[arg] = recent[-1] if recent else None
        elif name in _GET:
            recent.append(memo.get(arg))
        elif name == "GLOBAL":
            found.append(str(arg).replace(" ", "."))
            recent.append(None)
        elif name == "STACK_GLOBAL":
            mod, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
            found.append(f"{mod}.{attr}" if isinstance(mod, str) and isinstance(attr, str) else "?")
            recent.append(None)
        elif op.stack_after:
            recent.append(None)
        del recent[:-4]


def pickle_globals(path: str | Path) -> list[str]:
    """`module.name` of every global the pickle(s) in `path` reference, in order, without repeats."""
    path = Path(path)
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for member in z.namelist():
                    if member.endswith("data.pkl"):
                        _walk(io.BytesIO(z.read(member)), found)
        else:
            with open(path, "rb") as f:
                for _ in range(8):  # torch's legacy format: magic, protocol, sys info, the object, keys
                    _walk(f, found)
    except Exception:  # the end of the pickles (raw bytes follow), or a damaged file: what was found so far
        pass
    return list(dict.fromkeys(found))
