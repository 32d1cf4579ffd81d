"""Shared CLI plumbing: user errors become one clear line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

from stars_scale.errors import UserError


def one_line(msg: str) -> str:
    """A message as one line: embedded line breaks (from a YAML key, a library error) become ' | '."""
    return " | ".join(part.strip() for part in msg.splitlines() if part.strip()) or "(no message)"


def run_cli(fn: Callable[[], int | None]) -> int:
    """Run a CLI body. `UserError` -> 'error: <message>' on stderr, exit 2, no traceback.

    Set STARS_DEBUG=1 to see the traceback instead.
    """
    try:
        rc = fn()
    except UserError as e:
        if os.environ.get("STARS_DEBUG"):
            raise
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        oom = isinstance(e, MemoryError) or "can't allocate memory" in str(e) or type(e).__name__ == "OutOfMemoryError"
        if os.environ.get("STARS_DEBUG") or not oom:
            raise
        print("error: out of host memory (the model, batch or depth in the config is too large for this machine)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals are a UserError `PROG: argument --flag: why`, so that a CLI that
    parses inside `run_cli` prints one line and returns 2 (argparse itself prints the whole usage
    first and exits). Subparsers inherit the class."""

    def error(self, message: str):  # noqa: D401
        raise UserError(f"{self.prog}: {one_line(message)}")


def int_flag(kind: str, lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer (`12`, `1e9`) within the config's BOUNDS[kind] (ends overridable),
    so a flag is refused at parse time by the same rule as the config field it stands for."""
    from stars_scale.config import BOUNDS, bound_error, parse_int

    def parse(text: str) -> int:
        value = parse_int(text)
        if value is None:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}")
        why = bound_error(value, kind, lo, hi)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value

    parse.bounds = (BOUNDS[kind][0] if lo is None else lo, BOUNDS[kind][1] if hi is None else hi)  # type: ignore[attr-defined]
    return parse


def float_flag(lo: float, hi: float = math.inf, lo_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in [lo, hi] ((lo, hi] with lo_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text[:40]!r}")
        if value < lo or (lo_open and value == lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo:g}, got {value:g}")
        if value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi:g}, got {value:g}")
        return value

    parse.bounds = (lo, hi)  # type: ignore[attr-defined]
    return parse
