"""Training machinery: the LightningModule, the optimiser step (``step.SkipSafeStep``), optimiser and
schedule, compile, callbacks, preemption and run lock, checkpoint files and checks, the run's checks
before any data work (``preflight``) and building everything from a config (``build``). Imports the
model wing and ``datamodules``, never evaluation or jobs. Empty on purpose: importing a torch-free
module of this wing (``checkpoint_paths``) must not import torch."""
