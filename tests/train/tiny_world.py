"""A tiny hand-drawn tuple set (64-px images) and a fast training config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image, ImageDraw

from ardetect.config import Config, config_from_dict

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("cat", "mug", "car", "hat")


def draw_world(root: Path, n_concepts: int = 12, queries: int = 2, size: int = 64) -> pd.DataFrame:
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for c in range(n_concepts):
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))

        def draw(path: str, seed: int) -> list[float]:
            r = np.random.default_rng(seed)
            im = Image.new("RGB", (size, size), tuple(int(v) for v in r.integers(0, 255, 3)))
            s = int(r.integers(size // 4, size // 2))
            x, y = (int(v) for v in r.integers(0, size - s, 2))
            ImageDraw.Draw(im).rectangle([x, y, x + s - 1, y + s - 1], fill=colour)
            im.save(root / path)
            return [float(x), float(y), float(x + s), float(y + s)]

        tb = draw(f"img/x{c}.png", 1000 * c)
        split = "train" if c < n_concepts - 4 else ("val" if c < n_concepts - 2 else "test")
        for q in range(queries):
            qb = draw(f"img/q{c}_{q}.png", 1000 * c + q + 1)
            cls = CLASSES[c % len(CLASSES)]
            rows.append(
                dict(tuple_id=f"t{c:03d}_{q}", split=split, concept_id=f"c{c:03d}", base_class=cls, group="misc_objects",
                     prompt=f"A photo of V* {cls} on the beach.", concept_phrase=f"V* {cls}", template="A photo of {} on the beach.",
                     medium="photo", query_image=f"img/q{c}_{q}.png", query_box=qb, query_width=size, query_height=size,
                     train_image=f"img/x{c}.png", train_box=tb, train_width=size, train_height=size, generator="synthetic", gen_seed=q)
            )
    return pd.DataFrame(rows)


def fast_config(**sections) -> Config:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["world"]["image_size"] = 64
    raw["model"] = {"size": "nano", "overrides": {"num_queries": 16}}
    raw["train_phase1"] = {"epochs": 2, "batch_size": 2, "checkpoint_every": 2, "augment": True}
    raw["train_phase2"] = {"epochs": 1, "k_negatives": 2, "checkpoint_every": 2, "max_steps_per_epoch": 3}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return config_from_dict(raw, profiles_dir=REPO / "profiles")


def objects_of(tuples: pd.DataFrame) -> pd.DataFrame:
    """The objects table of a ``draw_world`` world: each image holds its concept's square alone."""
    from ardetect.data.schema import OBJECT_COLUMNS

    rows = {}
    for r in tuples.itertuples(index=False):
        for image, box in ((r.train_image, r.train_box), (r.query_image, r.query_box)):
            x0, y0, x1, y1 = box
            rows[image] = dict(image=image, object=1, role="concept", base_class=r.base_class, concept_id=r.concept_id,
                               box=list(box), mask=image, area=int((x1 - x0) * (y1 - y0)))
    return pd.DataFrame(list(rows.values()), columns=list(OBJECT_COLUMNS))


def assert_kill_and_resume_match(cmd: list[str], tmp_path: Path) -> Path:
    """Run ``cmd + [out]`` (a training script that writes ``out/latest.pt`` and ``out/final.pt``)
    once uninterrupted, once killed with SIGKILL as soon as its first mid-epoch checkpoint exists
    and then started again; assert it resumed and that both final weights are equal. Returns the
    resumed run's folder."""
    import os
    import signal
    import subprocess
    import time

    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run([*cmd, str(tmp_path / "full")], env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "latest.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ck = torch.load(out / "latest.pt", weights_only=False)
    assert ck["state"]["epoch"] == 0 and 0 < ck["state"]["step"]  # killed mid-epoch
    resumed = subprocess.run([*cmd, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=False)
    b = torch.load(out / "final.pt", weights_only=False)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return out
