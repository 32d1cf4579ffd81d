"""What the input-fuzzing tests share: a small config that trains, and running a CLI's `main`
in-process with the one-line-refusal check (`error: ...`, exit 2, no traceback)."""
from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
import yaml

BASE = {
    "seed": 0,
    "model": {"vocab_size": 15, "hidden": 32, "heads": 2, "max_seq_len": 16, "mlp_hidden": 64},
    "depth": {"dist": "fixed", "value": 2},
    "data": {"digits": 3, "batch_size": 8, "test_size": 16},
    "train": {"steps": 1, "progress": False, "host_malloc": "system"},
    "eval": {"samples": 16},
    "tracking": {"mlflow": False},
}


def _yaml_text(tree: dict) -> bytes:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True).encode()


def run_main(main, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, err.getvalue()


def assert_one_line_exit2(rc: int, err: str, case: Any) -> None:
    assert rc == 2, (case, rc, err[-2000:])
    assert "Traceback" not in err, (case, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory (the CLIs' relative paths land there), no MLflow server."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return work
