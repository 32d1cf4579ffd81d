"""Starting a run's tracking: refuse in one line, or say once, loudly, that the run is untracked.

`check_tracking(cfg.tracking)` runs before any work (stars-train's preflight): with
`tracking.required: true` a store MLflow cannot open here (a missing package, a server whose port
refuses connections) is refused at once. `start_tracker`
opens the run's tracker when training starts; when it cannot (a missing package, an unreachable
server, a store MLflow refuses) it raises a UserError under `tracking.required: true`, else prints
one WARNING line naming why and where the metrics go instead, and returns None.

A database store (the default `sqlite:///…/mlflow.db`, postgresql, mysql, mssql) needs sqlalchemy
and alembic, which `mlflow-skinny` does not install: without them MLflow refuses the URI.
"""
from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit

from stars_scale.errors import UserError
from stars_scale.optional import missing
from stars_scale.tracking.mlflow_tracker import MlflowTracker, _is_remote, _probe, default_tracking_uri

# URI schemes MLflow serves through its SQLAlchemy store (a `+driver` suffix allowed).
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def store_modules(uri: str) -> tuple[str, ...]:
    """What must be importable for MLflow to open the tracking store at `uri`."""
    scheme = urlsplit(uri).scheme.split("+")[0]
    return ("mlflow", "sqlalchemy", "alembic") if scheme in DB_SCHEMES else ("mlflow",)


def store_problem(uri: str) -> str | None:
    """Why MLflow cannot open the store at `uri` here (a missing package), or None."""
    gone = missing(*store_modules(uri))
    if not gone:
        return None
    if gone == ["mlflow"]:
        return "mlflow is not installed (pip install mlflow)"
    return (f"the store {uri} needs {' and '.join(gone)}, not installed (mlflow-skinny cannot open a "
            "database store: pip install mlflow, or set tracking.tracking_uri to an http(s) server)")


def check_tracking(t) -> None:
    """Preflight of the `tracking` section under `tracking.required: true`: a missing package, or a
    remote server whose port refuses connections, is refused now rather than after the model is built."""
    if not (t.mlflow and t.required):
        return
    uri = default_tracking_uri(t.tracking_uri)
    why = store_problem(uri)
    if why is None and _is_remote(uri):
        try:
            _probe(uri, 3.0)
        except ConnectionError as e:
            why = f"MLflow at {uri} did not start (ConnectionError: {e})"
    if why:
        raise UserError(f"tracking.required: true, but MLflow cannot start: {why}")


def start_tracker(t, fallback: Path, **kwargs) -> MlflowTracker | None:
    """The run's MlflowTracker (`kwargs` go to it), or None after one WARNING line on stderr;
    under `tracking.required: true` a tracker that cannot start is a UserError instead."""
    uri = default_tracking_uri(t.tracking_uri)
    why = store_problem(uri)
    if why is None:
        try:
            return MlflowTracker(uri, t.experiment, **kwargs)
        except Exception as e:  # an unreachable server, a store MLflow refuses
            why = f"MLflow at {uri} did not start ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
    if t.required:
        raise UserError(f"tracking.required: true, but MLflow cannot start: {why}")
    print(f"WARNING: this run is NOT tracked: {why}; metrics go to {fallback} only "
          "(tracking.required: true refuses to run untracked)", file=sys.stderr, flush=True)
    return None
