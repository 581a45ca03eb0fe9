"""``model.device``: where the detector trains and is scored.

The CPU tests run everywhere. ``test_cuda_training_runs_end_to_end`` and ``test_cuda_step_matches_cpu``
are the GPU checks: they run only where CUDA is present (never in CI, which has no GPU) and are
skipped elsewhere.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_map

from ardetect.config import ConfigError
from ardetect.devices import resolve_device, to_device
from ardetect.model.detector import region_candidates
from ardetect.train.engine import Batch, model_outputs
from ardetect.train.phases import build_model, criterion_of, run_phase1, run_phase2
from ardetect.train.pretrain import detection_outputs, pretrain_criterion, run_pretrain

from tiny_world import fast_config, objects_of

REPO = Path(__file__).resolve().parents[2]
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
def test_cuda_training_runs_end_to_end(tiny_world, tmp_path):
    """The GPU check of the whole training: pre-training, both phases and their validation on
    ``model.device: cuda`` finish with finite losses and weights on the GPU, and log what the same
    run on the CPU logs. The runs' losses are not compared: after a few AdamW steps they part by
    10-20 % (measured on an H200), since Adam's first steps turn rounding-sized gradients into
    whole learning-rate steps; ``test_cuda_step_matches_cpu`` compares a step exactly."""
    tuples, root = tiny_world
    sections = dict(pretrain={"epochs": 1, "classify_epochs": 1, "classify_batch_size": 8, "batch_size": 2, "max_steps_per_epoch": 3},
                    train_phase1={"epochs": 1, "max_steps_per_epoch": 3})
    gpu, gpu_hist = _train_all(fast_config(model={"device": "cuda"}, **sections), tuples, root, tmp_path / "gpu")
    cpu, cpu_hist = _train_all(fast_config(model={"device": "cpu"}, **sections), tuples, root, tmp_path / "cpu")
    assert next(gpu.parameters()).device.type == "cuda"
    assert len(gpu_hist) == len(cpu_hist) > 0
    for g, c in zip(gpu_hist, cpu_hist):
        assert g.keys() == c.keys()
        assert all(math.isfinite(v) for k, v in g.items() if k.startswith("train_loss")), g
    for k, v in gpu.state_dict().items():
        assert torch.isfinite(v.float()).all(), k


def _bench_train_gpu():
    """bench/bench_train_gpu.py, whose random batches the step check reuses."""
    spec = importlib.util.spec_from_file_location("_bench_train_gpu", REPO / "bench" / "bench_train_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cast_images(batch, dtype):
    """The batch with its image tensors (4-d floating) in ``dtype``; boxes and targets stay fp32."""
    cast = {f.name: getattr(batch, f.name).to(dtype) for f in dataclasses.fields(batch)
            if isinstance(getattr(batch, f.name), torch.Tensor) and getattr(batch, f.name).dim() == 4}
    return dataclasses.replace(batch, **cast)


def _loss_and_grads(model, criterion, forward, batch, device, dtype):
    outputs, token_mask, targets = forward(_cast_images(to_device(batch, device), dtype))
    outputs = tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, outputs)
    losses = criterion(outputs, targets, token_mask)
    model.zero_grad(set_to_none=True)
    losses["loss"].backward()
    grads = {n: p.grad.detach().cpu().double() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in losses.items()}, grads


def _jitter(model, scale: float = 0.01) -> None:
    """Move the weights off their initial lattice: the deformable attention's sampling offsets start
    as whole-pixel steps (weight zero, bias a grid), where bilinear sampling's gradient with respect
    to the location jumps; there fp32 and fp64 on the same CPU part by up to 600x the tolerance
    below, and so did the GPU and the CPU (measured). A small random step makes every point generic."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else p.abs()).clamp_min(1e-3))


def _step_matches(device: str, dtype: torch.dtype) -> None:
    """The same weights and batch give the same losses and gradients on ``device`` in ``dtype`` as on
    the CPU in fp32 (pre-training's step and phase 1's), and the same scores of a query's candidates
    (the paper's and the re-ranked)."""
    bench = _bench_train_gpu()
    cfg = fast_config()
    side = cfg.detector_image_size
    torch.manual_seed(0)
    cpu = build_model(cfg)
    cpu.add_region_classifier([*bench.CLASSES, "class7"], cfg.pretrain.classify_crop)
    cpu.set_phase(1).train()
    _jitter(cpu)
    other = copy.deepcopy(cpu).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    loss = cfg.train_phase1.loss
    steps = {
        "pretrain": (pretrain_criterion(cfg.pretrain.loss), detection_outputs, bench.pretrain_batch(cpu, 2, side, g)),
        "phase 1": (criterion_of(cfg, 1), lambda m, b: model_outputs(m, b, True, loss.weight_align > 0, loss.align_negatives),
                    bench.phase1_batch(2, side, g)),
    }
    for name, (criterion, forward, batch) in steps.items():
        torch.manual_seed(2)
        c_loss, c_grad = _loss_and_grads(cpu, criterion, lambda b: forward(cpu, b), batch, torch.device("cpu"), torch.float32)
        torch.manual_seed(2)
        o_loss, o_grad = _loss_and_grads(other, criterion, lambda b: forward(other, b), batch, torch.device(device), dtype)
        assert o_loss.keys() == c_loss.keys() and o_grad.keys() == c_grad.keys() and len(c_grad) > 10, name
        for k, v in c_loss.items():
            assert o_loss[k] == pytest.approx(v, rel=1e-3, abs=1e-5), (name, k)
        for k, v in c_grad.items():  # the absolute term: gradients that are zero but for rounding (a softmax's key bias)
            assert (o_grad[k] - v).norm() <= 1e-3 * v.norm() + 1e-6, (name, k)

    ev = cfg.evaluate
    scores = {}
    for model, dev, dt in ((cpu, "cpu", torch.float32), (other, device, dtype)):
        model.eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            query = model.encode_query(torch.rand(1, 3, side, side, generator=g).to(dev, dt), torch.tensor([[8.0, 8.0, side - 8.0, side - 8.0]],
                                       device=dev), ["A photo of V* cat on the beach."], ["V* cat"], region_map=True)
            images = torch.rand(6, 3, side, side, generator=g).to(dev, dt)
            found = region_candidates(model, None, images, query, torch.full((6, 2), float(side), device=dev), 4, ev.identity_top_k,
                                      identity=True, grids=ev.identity_grids, classes=True)[""]
        scores[dev, dt] = [t.cpu().double() for t in (found.prob, found.pick()[1], found.pick(5.0, ev.identity_grids[-1], 1.0)[1])]
    for c, o in zip(*scores.values()):  # sorted probabilities and best scores: ties may swap boxes, not values
        torch.testing.assert_close(o, c, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_fp64_step_matches_fp32_on_the_cpu():
    """The step check where every machine can run it: fp64 against fp32 on the CPU. It shows the
    check's tolerances hold for rounding alone, on the weights the GPU check uses."""
    _step_matches("cpu", torch.float64)


@needs_cuda
@pytest.mark.slow
def test_cuda_step_matches_cpu():
    """The GPU check of one step (``_step_matches``), TF32 off so that only rounding parts the two."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            _step_matches("cuda", torch.float32)
    finally:
        torch.set_float32_matmul_precision(precision)
