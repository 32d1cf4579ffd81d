"""Slurm launch: sweep specs, parallel-layout checks, sbatch rendering/submission, MLflow parent
runs, and a rendezvous probe. The shell side lives in the repository's ``launch/`` folder."""
