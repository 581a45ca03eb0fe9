"""Run phase 1 in its own process (for the kill/resume and DDP tests)."""

import pickle
import sys
from pathlib import Path

import pandas as pd
import torch

from ardetect.train.engine import init_distributed, trainable_state
from ardetect.train.phases import run_phase1

cfg = pickle.loads(Path(sys.argv[1]).read_bytes())
tuples = pd.read_parquet(sys.argv[2])
root, out = Path(sys.argv[3]), Path(sys.argv[4])
torch.set_num_threads(1)
rank, world = init_distributed()
model, _ = run_phase1(cfg, tuples, root, out, resume=True)
if rank == 0:
    print(f"world {world}")
name = "final.pt" if rank == 0 else f"final_rank{rank}.pt"
torch.save(trainable_state(model), out / name)
