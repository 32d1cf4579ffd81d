"""Shared CLI plumbing: user errors become one clear line on stderr and exit code 2."""
from __future__ import annotations

import os
import sys
from typing import Callable

from stars_scale.errors import UserError


def run_cli(fn: Callable[[], int | None]) -> int:
    """Run a CLI body. `UserError` -> 'error: <message>' on stderr, exit 2, no traceback.

    Set STARS_DEBUG=1 to see the traceback instead.
    """
    try:
        rc = fn()
    except UserError as e:
        if os.environ.get("STARS_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)
