"""Experiment tracking (MLflow)."""
from stars_scale.tracking.mlflow_tracker import MlflowTracker, default_tracking_uri
from stars_scale.tracking.start import check_tracking, start_tracker

__all__ = ["MlflowTracker", "check_tracking", "default_tracking_uri", "start_tracker"]
