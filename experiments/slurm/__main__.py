"""``python -m experiments.slurm {stage1,stage2,pipeline,bottleneck,cross-subject} ...`` (what ``make slurm-*`` runs)."""

import sys

from experiments.slurm.sweeps import main

if __name__ == "__main__":
    from datamodules.common import run_command

    sys.exit(run_command(main))
