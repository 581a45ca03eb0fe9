"""``model.device``: where the detector trains and is scored.

The CPU tests run everywhere. ``test_cuda_training_matches_cpu`` is the GPU check: it runs
only where CUDA is present (never in CI, which has no GPU) and is skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from ardetect.config import ConfigError
from ardetect.devices import resolve_device, to_device
from ardetect.train.engine import Batch
from ardetect.train.phases import run_phase1, run_phase2
from ardetect.train.pretrain import run_pretrain

from tiny_world import fast_config, objects_of

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU check runs on a GPU machine only")


def _batch() -> Batch:
    return Batch(
        images=torch.rand(2, 3, 8, 8), boxes=[torch.rand(1, 4), torch.zeros(0, 4)], query_images=torch.rand(1, 3, 8, 8),
        query_boxes=torch.tensor([[1.0, 1.0, 6.0, 6.0]]), prompts=["a V* cat"], phrases=["V* cat"], query_of=torch.tensor([0, 0]),
        positive=torch.tensor([True, False]), tuple_ids=["t0", "t0"], image_keys=["a.png", "b.png"],
    )


def test_to_device_moves_every_tensor_and_list_of_tensors_and_keeps_the_rest():
    batch = _batch()
    moved = to_device(batch, "meta")  # a device other than the CPU that every machine has
    assert moved.images.device.type == "meta" and moved.query_boxes.device.type == "meta"
    assert all(b.device.type == "meta" for b in moved.boxes) and [b.shape for b in moved.boxes] == [(1, 4), (0, 4)]
    assert moved.query_of.device.type == "meta" and moved.positive.device.type == "meta"
    assert moved.prompts == batch.prompts and moved.image_keys == batch.image_keys
    assert batch.images.device.type == "cpu"  # the original batch is left as it was
    assert to_device(batch, None) is batch


def test_resolve_device_reads_cpu_and_refuses_a_missing_gpu_naming_the_field():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device(None) == torch.device("cpu")
        with pytest.raises(ValueError, match=r"model\.device='cuda'.*no CUDA device"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match=r"model\.device='cuda:1'"):
            resolve_device("cuda:1")


def test_config_refuses_an_unknown_device_naming_the_field_and_value():
    with pytest.raises(ConfigError, match=r"model\.device.*gpu0"):
        fast_config(model={"device": "gpu0"})
    assert fast_config(model={"device": "cuda:1"}).model.device == "cuda:1"
    assert fast_config().model.device is None


@no_cuda
@pytest.mark.slow
def test_training_asked_for_cuda_on_a_cpu_machine_stops_before_writing(tiny_world, tmp_path):
    tuples, root = tiny_world
    cfg = fast_config(model={"device": "cuda"})
    with pytest.raises(ValueError, match=r"model\.device='cuda'"):
        run_phase1(cfg, tuples, root, tmp_path / "p1", resume=False)
    assert not any((tmp_path / "p1").glob("*.pt"))


def _train_all(cfg, tuples, root, out):
    run_pretrain(cfg, objects_of(tuples), tuples, root, out / "pre")
    _, r1 = run_phase1(cfg, tuples, root, out / "p1", resume=False, init=out / "pre" / "model.pt")
    p2, r2 = run_phase2(cfg, out / "p1" / "best.pt", tuples, root, out / "p2", resume=False)
    return p2, r1.history + r2.history


@needs_cuda
@pytest.mark.slow
def test_cuda_training_matches_cpu(tiny_world, tmp_path):
    """The GPU check: pre-training, both phases and their validation on ``model.device: cuda``
    give finite losses and weights on the GPU, close to the same run on the CPU."""
    tuples, root = tiny_world
    sections = dict(pretrain={"epochs": 1, "classify_epochs": 1, "classify_batch_size": 8, "batch_size": 2, "max_steps_per_epoch": 3},
                    train_phase1={"epochs": 1, "max_steps_per_epoch": 3})
    gpu, gpu_hist = _train_all(fast_config(model={"device": "cuda"}, **sections), tuples, root, tmp_path / "gpu")
    cpu, cpu_hist = _train_all(fast_config(model={"device": "cpu"}, **sections), tuples, root, tmp_path / "cpu")
    assert next(gpu.parameters()).device.type == "cuda"
    for g, c in zip(gpu_hist, cpu_hist):
        assert g.keys() == c.keys()
        for k, v in g.items():
            if k.startswith("train_loss"):
                assert v == pytest.approx(c[k], rel=0.05, abs=1e-3), k
    g, c = gpu.state_dict(), cpu.state_dict()
    for k in c:
        assert torch.isfinite(g[k].float()).all(), k
