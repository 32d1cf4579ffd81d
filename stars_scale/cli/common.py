"""Shared CLI plumbing: user errors become one clear line on stderr and exit code 2."""
from __future__ import annotations

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
