"""Every benchmark ``make bench`` runs (``python -m experiments.bench``), one module per JSON result in
``bench_results/``: ``data_loader``, ``stage1_encoder``, ``stage2_step``, ``condition_step`` (with
``stage2_memory``), ``callback_overhead``, ``startup``, ``slurm_round_trip``; ``gpu_check`` (``make gpu-check``,
``python -m experiments.gpu_check``) writes ``gpu_check.json``."""
