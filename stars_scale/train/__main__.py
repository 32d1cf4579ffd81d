"""`python -m stars_scale.train` (what torchrun and the Slurm wrapper run)."""
import sys

from stars_scale.cli.train import main

sys.exit(main())
