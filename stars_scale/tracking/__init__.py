"""Experiment tracking (MLflow)."""
from stars_scale.tracking.mlflow_tracker import MlflowTracker, default_tracking_uri

__all__ = ["MlflowTracker", "default_tracking_uri"]
