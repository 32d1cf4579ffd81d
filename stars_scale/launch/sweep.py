"""Sweep specs for ``stars-launch slurm --array``: ``KEY=V1,V2,...`` -> one job-array task per value.

Several ``--array`` options form the Cartesian product (the first one varies slowest). Values are
YAML scalars, parsed like ``--set`` values; commas inside ``[...]`` or ``{...}`` do not split, so
``--array eval.depths=[1,2],[4,8]`` has two values. Array task ``i`` gets ``--set KEY=<value>`` for
every key of combination ``i``.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from stars_scale.errors import UserError

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class SweepTask:
    index: int
    overrides: tuple[str, ...]  # ("stars.lam=0.05", ...), passed as --set

    @property
    def slug(self) -> str:
        """A file-name-safe label, e.g. ``stars.lam=0.05``, at most 60 characters."""
        text = "_".join(self.overrides)
        text = re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-")
        return text[:60] or "task"

    @property
    def name(self) -> str:
        return f"{self.index}_{self.slug}"


def split_values(text: str) -> list[str]:
    """Split on commas that are not inside brackets or braces."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced ']' or '}'")
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError("unbalanced '[' or '{'")
    out.append("".join(cur))
    return [v.strip() for v in out]


def parse_axis(spec: str) -> tuple[str, list[str]]:
    if "=" not in spec:
        raise UserError(f"--array {spec!r}: expected KEY=V1,V2,..., e.g. --array stars.lam=0,0.05,0.1")
    key, raw = spec.split("=", 1)
    key = key.strip()
    if not _KEY.match(key):
        raise UserError(f"--array {spec!r}: {key!r} is not a dotted config key such as stars.lam")
    try:
        values = split_values(raw)
    except ValueError as e:
        raise UserError(f"--array {key}: {e} in {raw!r}") from None
    if any(v == "" for v in values):
        raise UserError(f"--array {key}: empty value in {raw!r} (expected V1,V2,...)")
    if len(set(values)) != len(values):
        raise UserError(f"--array {key}: repeated value in {raw!r}")
    return key, values


def parse_sweep(specs: list[str] | None, fixed_keys: set[str] = frozenset()) -> list[SweepTask]:
    """All tasks of the sweep, in array-index order; [] when there is no sweep."""
    if not specs:
        return []
    axes = [parse_axis(s) for s in specs]
    keys = [k for k, _ in axes]
    for k in keys:
        if keys.count(k) > 1:
            raise UserError(f"--array {k}: given more than once (list all its values in one --array)")
        if k in fixed_keys:
            raise UserError(f"--array {k}: also given with --set; keep it in one place")
    tasks = []
    for i, combo in enumerate(itertools.product(*(vals for _, vals in axes))):
        tasks.append(SweepTask(i, tuple(f"{k}={v}" for k, v in zip(keys, combo))))
    return tasks
