"""argparse pieces shared by the CLIs: a parser whose refusals are one line, and flag types that
check a value against the same bounds as the config field it stands for (`config.BOUNDS`)."""
from __future__ import annotations

import argparse
import math
from typing import Callable

from stars_scale.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals are a UserError `PROG: argument --flag: why`, so that a CLI that
    parses inside `run_cli` prints one line and returns 2 (argparse itself prints the whole usage
    first and exits). Subparsers inherit the class."""

    def error(self, message: str):  # noqa: D401
        raise UserError(f"{self.prog}: {message}")  # run_cli prints it as one line


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
