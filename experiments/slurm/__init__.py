"""Slurm array jobs for both stages (``make slurm-*``; ``python -m experiments.slurm --help``).

- ``sweeps``: which array task runs which config (sweep files: one line of ``experiments.run`` arguments per task,
  each with its own stable run directory) and the exact ``sbatch`` calls, with ``afterok`` dependencies.
- ``task``: what each array task runs inside the allocation (``srun python -m experiments.slurm.task SWEEP``).
- ``fit_array.sbatch``: the batch script (``--signal=SIGUSR1@90``, ``--requeue``, one srun task per device).
- ``jobs``: ``scontrol`` queries and waiting for jobs.
- ``local_cluster``: a throwaway single-node Slurm (munged, slurmctld, slurmd) for tests and the benchmark.
- the Slurm benchmark (a local array round trip, ``python -m experiments.bench --only slurm``) is
  ``experiments.benchmarks.slurm_round_trip``.
"""

from experiments.slurm.sweeps import Resources, Submission, Sweep, Task  # noqa: F401
