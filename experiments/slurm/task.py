"""What one array task runs inside its allocation (one process per srun task, i.e. per device):

    srun python -m experiments.slurm.task SWEEP_FILE [--index N]

Task ``N`` (default: ``$SLURM_ARRAY_TASK_ID``) runs the N-th line of the sweep file through the CLI in this process,
so Lightning's SLURMEnvironment handles SIGUSR1 here: it saves ``hpc_ckpt_<n>.ckpt`` into the task's
``default_root_dir`` and requeues ``<array job>_<task>``; the requeued run resumes from it (``ckpt_path`` unset).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from experiments.slurm.sweeps import read_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.slurm.task", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the sweep file (python -m experiments.slurm writes it)")
    parser.add_argument("--index", type=int, default=None, help="default: $SLURM_ARRAY_TASK_ID")
    parser.add_argument("--print", action="store_true", help="print the task's command and exit")
    args = parser.parse_args(argv)
    index = args.index
    if index is None:
        if "SLURM_ARRAY_TASK_ID" not in os.environ:
            parser.error("no --index and no SLURM_ARRAY_TASK_ID (not an array task)")
        index = int(os.environ["SLURM_ARRAY_TASK_ID"])
    run_args = read_line(args.sweep, index)
    rank = os.environ.get("SLURM_PROCID", "0")
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    print(f"[task {index} rank {rank} restart {restart}] python -m experiments.run {shlex.join(run_args)}",
          file=sys.stderr, flush=True)
    if args.print:
        return 0
    from experiments.run import cli_main

    cli_main(run_args)
    return 0


if __name__ == "__main__":
    from datamodules.common import run_command

    sys.exit(run_command(main))
