"""CPU benchmark of a detection pre-training step of the ``nano`` detector, and the ways to speed it up.

One optimisation step (forward, the set criterion with Hungarian matching on every
decoder layer and the encoder proposals, backward, the fused AdamW ``pretrain`` uses) on
a batch of random images, each with 3 objects and a prompt of 7 classes, as ``pretrain``
trains. Measured in one run, each against the reference (128 px, batch 4, contiguous
fp32), as seconds per image and their ratio (below 1 = faster per image):

- channels-last memory format (model and images);
- batch 8 and batch 2 instead of 4;
- 96 px images instead of 128 (lower-resolution pre-training);
- bfloat16 autocast of batch 8 (the shipped batch), also as a ratio to fp32 batch 8;
- channels-last with bfloat16 autocast at batch 8 (on CPUs with AMX, oneDNN's bf16
  convolutions want channels-last), also as a ratio to fp32 batch 8;
- ``torch.compile`` of the model (``--compile``: compiling takes minutes on 2 cores).

Run: ``PYTHONPATH=src .venv/bin/python bench/bench_pretrain_cpu.py [--threads N] [--compile]``
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ardetect.model import ModelConfig, build, param_groups  # noqa: E402
from ardetect.train.losses import SetCriterion  # noqa: E402
from ardetect.train.matcher import HungarianMatcher, Target  # noqa: E402

from _timing import apply_threads, parser_with_threads, timed  # noqa: E402  (bench/ is the script's folder)

PROMPT = "cat . dog . mug . car . hat . lamp . kite ."


def step_fn(model, batch: int, size: int, channels_last: bool = False, forward=None, bf16: bool = False):
    """A closure running one pre-training step on fixed random inputs (``bf16``: forward and loss under
    ``torch.autocast("cpu", torch.bfloat16)``, the backward and the fp32 weights' update as autocast leaves them)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    ids = model.tokenizer([PROMPT] * batch, return_tensors="pt")
    n_tokens = ids["input_ids"].shape[1]
    targets = []
    for _ in range(batch):
        centres = torch.rand(3, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(3, 2, generator=g) * 0.2 + 0.15
        tokens = torch.zeros(3, n_tokens)
        for j in range(3):
            tokens[j, 1 + 2 * j] = 1.0  # "cat", "dog", "mug"
        targets.append(Target(torch.cat([centres, sizes], 1), tokens))
    criterion = SetCriterion(HungarianMatcher())
    optimizer = torch.optim.AdamW(param_groups(model, 1e-3, 1e-3, 0.1), lr=1e-3, fused=True)  # as pretrain steps
    run = model if forward is None else forward  # a compiled module has no truth value

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            cache = model.encode_text_ids(ids["input_ids"], ids["attention_mask"])
            out = run(images, cache)
            outputs = {"pred_logits": out.pred_logits, "pred_boxes": out.pred_boxes, "aux_outputs": out.aux_outputs,
                       "enc_outputs": out.enc_outputs}
            loss = criterion(outputs, targets, out.token_mask)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def fresh(size: int | None = None):
    torch.manual_seed(0)
    cfg = ModelConfig.named("nano") if size is None else ModelConfig.named("nano", image_size=(size, size))
    return build(cfg).set_phase(1).train()


def main() -> None:
    parser = parser_with_threads(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    args = parser.parse_args()
    apply_threads(args)
    print(f"nano detection pre-training step, torch {torch.__version__}, {torch.get_num_threads()} threads")

    ref = timed(step_fn(fresh(128), 4, 128), args.repeats) / 4
    print(f"reference  128 px, batch 4          {ref * 1000:7.1f} ms an image")

    def row(name: str, t: float) -> None:
        print(f"{name:36s} {t * 1000:7.1f} ms an image   ratio to reference {t / ref:.2f}", flush=True)

    model = fresh(128).to(memory_format=torch.channels_last)
    row("channels-last, 128 px, batch 4", timed(step_fn(model, 4, 128, channels_last=True), args.repeats) / 4)
    batch8 = timed(step_fn(fresh(128), 8, 128), args.repeats) / 8
    row("batch 8, 128 px", batch8)
    bf16 = timed(step_fn(fresh(128), 8, 128, bf16=True), args.repeats) / 8
    row("batch 8, bf16 autocast", bf16)
    print(f"{'':36s} ratio of bf16 autocast to fp32 at batch 8: {bf16 / batch8:.2f}", flush=True)
    model = fresh(128).to(memory_format=torch.channels_last)
    both = timed(step_fn(model, 8, 128, channels_last=True, bf16=True), args.repeats) / 8
    row("batch 8, channels-last + bf16", both)
    print(f"{'':36s} ratio of channels-last + bf16 to fp32 at batch 8: {both / batch8:.2f}", flush=True)
    row("batch 2, 128 px", timed(step_fn(fresh(128), 2, 128), args.repeats) / 2)
    row("96 px, batch 4", timed(step_fn(fresh(96), 4, 96), args.repeats) / 4)
    if args.compile:
        model = fresh(128)
        compiled = torch.compile(model)
        start = time.perf_counter()
        step = step_fn(model, 4, 128, forward=compiled)
        step()  # the first call compiles
        print(f"torch.compile: first step (compiling) {time.perf_counter() - start:.1f} s", flush=True)
        row("torch.compile, 128 px, batch 4", timed(step, args.repeats, warmup=2) / 4)


if __name__ == "__main__":
    main()
