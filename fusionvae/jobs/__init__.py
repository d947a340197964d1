"""Jobs: the Hydra entry points (``cli``: train.py / evaluate.py and the console scripts), the train
and evaluate jobs, the fuse CLI, the command line before Hydra starts (``run_args``), SLURM sizing,
the sweep summary and how an entry point reports errors (``reporting``). Nothing imports this wing."""
