"""GPU benchmark of the README's GPU recipe: a pre-training step, a phase-1 step and one query's scoring at a
paper size (``T-B`` by default) on the world's images, and the stage times they project for the default world.

Each step is the pipeline's own: ``detection_outputs`` and ``train_steps`` with pre-training's criterion
(batch ``--pretrain-batch`` images, 3 objects each, a 7-class prompt); ``model_outputs`` with phase 1's
criterion, region contrast included (``--phase1-batch`` queries, each with its positive and one negative);
``region_candidates`` on a query's 104 candidates as ``evaluate`` scores them (5 boxes, the identity
grids, the class match). Inputs are random: the cost of a step does not depend on the weights. Printed:
seconds a step (median over ``--steps`` after warm-up), peak GPU memory, and the projection for
``--pretrain-images`` images x ``pretrain.epochs``, ``--phase1-batches`` x ``train_phase1.epochs`` and
``--queries`` scored queries (the defaults: the default world's 3,328, 312 and 584), read from params.yaml.
The projection leaves out data loading, the crop classification and the val checks.

Run on the device machine (no venv there): ``PYTHONPATH=src python3 bench/bench_train_gpu.py [--size B-B] [--bf16]``.
``--tiny`` checks the script on any device with the nano model and a few steps.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from ardetect.config import config_from_dict  # noqa: E402
from ardetect.model import param_groups  # noqa: E402
from ardetect.model.detector import region_candidates  # noqa: E402
from ardetect.train.engine import Batch, TrainState, model_outputs, train_steps  # noqa: E402
from ardetect.train.phases import build_model, criterion_of  # noqa: E402
from ardetect.train.pretrain import DetectionBatch, detection_outputs, pretrain_criterion  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "mug", "car", "hat", "lamp", "kite"]


def config(size: str, image_size: int | None, num_queries: int | None):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    overrides = {**raw["model"].get("overrides", {}), **({} if num_queries is None else {"num_queries": num_queries})}
    raw["model"] = {**raw["model"], "size": size, "image_size": image_size, "overrides": overrides}
    return config_from_dict(raw, profiles_dir=REPO / "profiles")


def boxes(g: torch.Generator, n: int) -> torch.Tensor:
    """n random normalised cxcywh boxes inside the image."""
    return torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.2 + 0.15], 1)


def pretrain_batch(model, n: int, side: int, g: torch.Generator) -> DetectionBatch:
    ids = model.tokenizer([" . ".join(CLASSES) + " ."] * n, return_tensors="pt")
    tokens = ids["input_ids"].shape[1]
    maps = []
    for _ in range(n):
        m = torch.zeros(3, tokens)
        for j in range(3):
            m[j, 1 + 2 * j] = 1.0  # "cat", "dog", "mug"
        maps.append(m)
    return DetectionBatch(torch.rand(n, 3, side, side, generator=g), ids["input_ids"], ids["attention_mask"], [boxes(g, 3) for _ in range(n)],
                          maps, [f"img{i}" for i in range(n)], [CLASSES[:3]] * n)


def phase1_batch(n: int, side: int, g: torch.Generator) -> Batch:
    """n queries, each paired with its positive (one box) and one negative (no box)."""
    q = boxes(g, n)
    xyxy = torch.cat([q[:, :2] - q[:, 2:] / 2, q[:, :2] + q[:, 2:] / 2], 1) * side
    return Batch(
        images=torch.rand(2 * n, 3, side, side, generator=g), boxes=[boxes(g, 1) if i % 2 == 0 else torch.zeros(0, 4) for i in range(2 * n)],
        query_images=torch.rand(n, 3, side, side, generator=g), query_boxes=xyxy,
        prompts=["A watercolor painting of V* cat on the beach."] * n, phrases=["V* cat"] * n,
        query_of=torch.arange(n).repeat_interleave(2), positive=torch.arange(2 * n) % 2 == 0,
        tuple_ids=[f"t{i // 2}" for i in range(2 * n)], image_keys=[f"img{i}" for i in range(2 * n)],
    )


def median_step(run_one, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        run_one()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        run_one()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="T-B", help="model.size: T-B | B-B | B-L")
    ap.add_argument("--image-size", type=int, default=None, help="model.image_size; default: the world's (params.yaml)")
    ap.add_argument("--num-queries", type=int, default=300, help="model.overrides.num_queries, as the README's recipe (nano: its own)")
    ap.add_argument("--pretrain-batch", type=int, default=16)
    ap.add_argument("--phase1-batch", type=int, default=8)
    ap.add_argument("--candidate-batch", type=int, default=None, help="evaluate.candidate_batch; default params.yaml's")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast of the pre-training step's forward (pretrain.precision: bf16); "
                    "phase 1 runs fp32, as the pipeline's does")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pretrain-images", type=int, default=3328)
    ap.add_argument("--phase1-batches", type=int, default=312, help="phase 1's batches an epoch at train_phase1.batch_size")
    ap.add_argument("--queries", type=int, default=584)
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--tiny", action="store_true", help="nano model, small batches, one step: checks the script anywhere")
    args = ap.parse_args()
    if args.tiny:  # a check of the script, not a measurement
        args.size, args.steps, args.warmup, args.pretrain_batch, args.phase1_batch = "nano", 1, 1, 2, 2
        args.image_size = args.image_size or 64
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = config(args.size, args.image_size, None if args.size == "nano" else args.num_queries)
    side = cfg.detector_image_size
    torch.manual_seed(0)
    model = build_model(cfg)
    model.add_region_classifier([*CLASSES, *(f"class{i}" for i in range(19))], cfg.pretrain.classify_crop)  # 26 classes, as the world
    model.to(device).set_phase(1).train()
    g = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"{args.size} at {side} px on {name}, torch {torch.__version__}, bf16 autocast {'on' if args.bf16 else 'off'} (pre-training)")
    autocast = torch.bfloat16 if args.bf16 else None
    p = cfg.pretrain
    optimizer = torch.optim.AdamW(param_groups(model, p.lr, p.lr_backbone, p.lr_linear_proj_mult), lr=p.lr, fused=cuda)

    def steps_of(criterion, forward, batch, autocast=None):
        return lambda: train_steps(criterion, optimizer, iter([(0, batch)]), forward, 1, TrainState(), epoch=0, clip_grad=p.clip_grad,
                                   device=device, autocast=autocast)

    pre_criterion = pretrain_criterion(p.loss)
    pre_batch = pretrain_batch(model, args.pretrain_batch, side, g)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    pre = median_step(steps_of(pre_criterion, lambda b: detection_outputs(model, b), pre_batch, autocast), args.steps, args.warmup, sync)
    pre_mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")

    loss = cfg.train_phase1.loss
    p1_batch = phase1_batch(args.phase1_batch, side, g)
    align = loss.weight_align > 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ph1 = median_step(steps_of(criterion_of(cfg, 1), lambda b: model_outputs(model, b, True, align, loss.align_negatives), p1_batch),
                      args.steps, args.warmup, sync)
    ph1_mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")

    ev = cfg.evaluate
    model.eval()
    with torch.no_grad():
        query = model.encode_query(torch.rand(1, 3, side, side, generator=g).to(device), torch.tensor([[20.0, 20.0, side - 20.0, side - 20.0]],
                                   device=device), ["A watercolor painting of V* cat on the beach."], ["V* cat"], region_map=True)
        feats = model.encode_images(torch.rand(104, 3, side, side, generator=g).to(device), region_map=True)
        sizes = torch.full((104, 2), float(side), device=device)
        score = lambda: region_candidates(model, None, feats, query, sizes, args.candidate_batch or ev.candidate_batch, ev.identity_top_k,  # noqa: E731
                                          identity=True, grids=ev.identity_grids, classes=True)
        per_query = median_step(score, args.steps, args.warmup, sync)

    pre_steps = math.ceil(args.pretrain_images / args.pretrain_batch) * p.epochs
    ph1_steps = args.phase1_batches * cfg.train_phase1.epochs * cfg.train_phase1.batch_size // args.phase1_batch  # the batches counted at params.yaml's batch size
    print(f"pre-training step, batch {args.pretrain_batch}: {pre * 1000:8.1f} ms  (peak {pre_mem:.1f} GiB)")
    print(f"phase-1 step, {args.phase1_batch} queries x 2 images: {ph1 * 1000:8.1f} ms  (peak {ph1_mem:.1f} GiB)")
    print(f"scoring one query's 104 candidates:        {per_query * 1000:8.1f} ms")
    print(f"projected: pretrain {pre_steps} steps {pre * pre_steps / 60:.1f} min; phase 1 {ph1_steps} steps {ph1 * ph1_steps / 60:.1f} min; "
          f"evaluate {args.queries} queries {per_query * args.queries / 60:.1f} min (one detector pass; ARD and ARD- share it)")


if __name__ == "__main__":
    main()
