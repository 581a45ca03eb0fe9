"""DVC stage entry points: a pure library call plus a thin main that does the I/O.

Each stage is run as ``python -m ardetect.stages.<name>`` from the repository root.
"""

STAGES = ("check", "exemplars", "generate", "tuples", "validate", "world2", "pretrain", "train_phase1", "train_phase2", "train_abc", "train_abc_ard", "evaluate", "export")
