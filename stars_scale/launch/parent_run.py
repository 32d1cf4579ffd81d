"""The MLflow parent run of a job-array sweep.

``stars-launch slurm --array ...`` creates one parent run (when a tracking URI is set) and gives
its id to every array task as ``STARS_MLFLOW_PARENT_RUN_ID``; the trainer's tracking code opens
each task's run as a child of it (tag ``mlflow.parentRunId``).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

import yaml

from stars_scale.config import RunConfig
from stars_scale.errors import UserError
from stars_scale.launch.sweep import SweepTask

PARENT_ENV = "STARS_MLFLOW_PARENT_RUN_ID"


def tracking_uri(cfg: RunConfig) -> str | None:
    """The URI the trainer will use: tracking.tracking_uri, else $MLFLOW_TRACKING_URI."""
    if not cfg.tracking.mlflow:
        return None
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def _client(uri: str):
    # Fail within seconds, not minutes, when the server is down.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _quiet():
    """MLflow prints run links on stdout; stdout of stars-launch is only the job id."""
    return contextlib.redirect_stdout(sys.stderr)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(e).__name__


def create_parent(uri: str, cfg: RunConfig, name: str, sweep: list[SweepTask],
                  sweep_specs: list[str]) -> str:
    """Create the parent run; return its id. UserError when the server cannot be reached."""
    try:
        with _quiet():
            client = _client(uri)
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
            run = client.create_run(exp_id, run_name=name, tags={
                "stars.role": "sweep-parent",
                "stars.sweep": " ".join(sweep_specs),
                "stars.sweep_size": str(len(sweep)),
            })
            run_id = run.info.run_id
            client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
            client.log_text(run_id, json.dumps([{"index": t.index, "overrides": list(t.overrides)}
                                                for t in sweep], indent=2), "sweep.json")
    except UserError:
        raise
    except Exception as e:  # any failure to reach or write the server: one line for the user
        raise UserError(f"tracking: cannot create the MLflow parent run at {uri}: {_one_line(e)}") from None
    return run_id


def finish_parent(uri: str, run_id: str, job_id: str | None, error: str | None = None) -> None:
    """Record the Slurm job id and close the parent (the children carry the training status)."""
    try:
        with _quiet():
            client = _client(uri)
            if job_id:
                client.set_tag(run_id, "slurm.job_id", job_id)
            if error:
                client.set_tag(run_id, "stars.submit_error", error[:500])
            client.set_terminated(run_id, status="FAILED" if error else "FINISHED")
    except Exception as e:
        raise UserError(f"tracking: cannot update the MLflow parent run {run_id} at {uri}: "
                        f"{_one_line(e)}") from None
