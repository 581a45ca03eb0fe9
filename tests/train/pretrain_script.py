"""Run the detection pre-training in its own process (for the kill/resume test)."""

import pickle
import sys
from pathlib import Path

import pandas as pd
import torch

from ardetect.train.pretrain import run_pretrain

cfg = pickle.loads(Path(sys.argv[1]).read_bytes())
tuples, objects = pd.read_parquet(sys.argv[2]), pd.read_parquet(sys.argv[3])
root, out = Path(sys.argv[4]), Path(sys.argv[5])
torch.set_num_threads(1)
model, _ = run_pretrain(cfg, objects, tuples, root, out, resume=True)
torch.save(model.state_dict(), out / "final.pt")  # every weight, the frozen region classifier's too
