"""Checkpoints, in one package: the run directory's format, manifests, atomic and asynchronous
saves (`rundir`), every rank's pieces of the model and optimizer under their single-device names
(`dcp`), and tensor files that never run code on load (`files`).

The entries:

    save_checkpoint(run_dir, step, write_files, state, keep_last, ...)   save: atomic, manifest last
    verify_checkpoint(ckpt)                    verify: every file against the sha256 manifest
    resolve_checkpoint(path) -> ckpt           a checkpoint or a run dir -> the newest that verifies
    read_checkpoint(ckpt) -> (RunConfig, sd)   load it in one process, whatever layout wrote it
    dcp.save / dcp.load                        (collective) each rank's pieces, for training resumes
"""
from stars_scale.checkpoint import dcp
from stars_scale.checkpoint.dcp import read_checkpoint, read_model_state
from stars_scale.checkpoint.files import CheckpointError, check_tensor_files, load_tensor_file, save_tensor_file
from stars_scale.checkpoint.rundir import (MANIFEST_FILE, RANKS_DIR, RUN_CONFIG, STATE_FILE, AsyncSave, MetricsLog,
                                           CheckpointSaveError, identity_changes, open_run_dir, write_run_config,
                                           SaveRetry, checkpoint_root, checkpoint_step, clean_stale,
                                           latest_checkpoint, list_checkpoints, load_state, prune, read_manifest,
                                           read_rank_state, rank_state_text, resolve_checkpoint, save_checkpoint,
                                           set_aside_stale_metrics, step_dir_name, truncate_metrics,
                                           verify_checkpoint, write_manifest, write_rank_state)

__all__ = ["dcp", "read_checkpoint", "read_model_state", "CheckpointError", "check_tensor_files", "load_tensor_file",
           "save_tensor_file", "MANIFEST_FILE", "RANKS_DIR", "RUN_CONFIG", "STATE_FILE", "MetricsLog",
           "identity_changes", "open_run_dir", "write_run_config", "AsyncSave", "CheckpointSaveError",
           "SaveRetry", "checkpoint_root", "checkpoint_step", "clean_stale", "latest_checkpoint", "list_checkpoints",
           "load_state", "prune", "read_manifest", "read_rank_state", "rank_state_text", "resolve_checkpoint",
           "save_checkpoint", "set_aside_stale_metrics", "step_dir_name", "truncate_metrics", "verify_checkpoint",
           "write_manifest", "write_rank_state"]
