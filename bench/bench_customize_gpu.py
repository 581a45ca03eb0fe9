"""GPU benchmark: seconds per customization step and per generated image at Stable Diffusion 2.1-base size.

Random weights run at the same speed as trained ones. The models are built from SD
2.1-base's configs (UNet 866M, VAE 84M, OpenCLIP-H text encoder 340M parameters, the
text encoder with this project's small test tokenizer: its embedding table is smaller,
which does not change the step time), saved to a temp folder and loaded through the
real loader, then customized with :func:`ardetect.generation.customize.customize` on a
masked 512-px exemplar, batch 1 instance + 1 prior image, and sampled with DDIM.

A step's time is the difference between a run of 2K and one of K steps, divided by K,
so one-off costs (first-call compilation, allocator warm-up) fall out; they are printed
apart ("one-off s": the first run's time less K steps of each phase). A short
customization before the table takes the process's own first-call costs. Printed per
setting: seconds per textual-inversion step, per joint step, per image (50 guided DDIM
steps + VAE decode, ``sample_batch`` images to a call), and the projected minutes per
exemplar for the full recipe (400 + 400 steps, 10 images), as a ratio to the first row
("plain") measured in the same run, and, for orientation only, against a figure measured
elsewhere: the plain bf16-autocast recipe on an H100 (115 ms, 187 ms, 1.9 s per 4 images:
2.1 min), another card at another time.

One row per setting, printed as it is measured (a run cut short keeps its rows), each of
the first four adding one change to the row above, so each change's effect shows: plain
(explicit attention probabilities in every cross-attention layer, every step encoding its
prompts, one image per sampling call: the recipe as first built), + fused attention
(``scaled_dot_product_attention`` wherever the attention loss does not read the
probabilities), + cached text encodings (those that cannot change within a phase encoded
once per phase), + batched sampling (4 images to a call). Then two variants of the
batched-sampling row: its joint phase as lora, and last torch.compile of the UNet for the
steps (GPU only; a warm-up run first, so both timed runs find it compiled), whose
compilation takes the longest.

Run on the device machine: ``PYTHONPATH=src python3 bench/bench_customize_gpu.py``.
Without CUDA (or with ``--tiny``) it runs the tiny test models on the CPU and prints the
same table; those figures check the script and say nothing of the GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ardetect.config import CustomizationConfig  # noqa: E402
from ardetect.generation.customize import customize, sample_many  # noqa: E402
from ardetect.generation.models import load_stable_diffusion  # noqa: E402

ANCHOR = {"ti": 0.115, "joint": 0.187, "image": 1.9 / 4}  # H100, bf16 autocast, seconds
RECIPE = {"ti": 400, "joint": 400, "images": 10}


def write_sd21_size(out: Path) -> Path:
    """A pipeline folder with Stable Diffusion 2.1-base's architecture and random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ardetect.generation.tiny import prompt_words, write_clip_tokenizer_files

    write_clip_tokenizer_files(out / "tok", prompt_words())
    tok = CLIPTokenizer(str(out / "tok" / "vocab.json"), str(out / "tok" / "merges.txt"), model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                        num_attention_heads=16, max_position_embeddings=77, projection_dim=512,
                                        hidden_act="gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          steps_offset=1, prediction_type="epsilon")
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(out / "sd")
    return out / "sd"


def exemplar(res: int) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8))
    mask = np.zeros((res, res), bool)
    mask[res // 4 : 3 * res // 4, res // 4 : 3 * res // 4] = True
    return img, mask


def per_step(folder: Path, cfg: CustomizationConfig, k: int, device: str, repeats: int = 1,
             **speedups) -> tuple[float, float, float]:
    """Steady seconds per textual-inversion and per joint step, (run of 2k - run of k) / k, each run's phase time the
    least of ``repeats`` runs (a shared machine's stalls only add time), and the one-off seconds of the first run
    (compiling with ``cfg.compile``: a warm-up run of k steps before the timed ones)."""
    img, mask = exemplar(cfg.resolution)
    prior = [exemplar(cfg.resolution)[0]]
    totals: dict = {}
    for n in ([k] if cfg.compile else []) + [k, 2 * k] * repeats:
        pipe = load_stable_diffusion(str(folder), device=device)
        c = cfg.model_copy(update={"ti_steps": n, "joint_steps": n})
        _, rep = customize(pipe, img, mask, "cat", c, seed=0, prior_images=prior, **speedups)
        totals.setdefault("first", rep.seconds["ti"] + rep.seconds["joint"])
        best = totals.setdefault(n, dict(rep.seconds))
        totals[n] = {ph: min(best[ph], rep.seconds[ph]) for ph in ("ti", "joint")}
        del pipe
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    ti = (totals[2 * k]["ti"] - totals[k]["ti"]) / k
    joint = (totals[2 * k]["joint"] - totals[k]["joint"]) / k
    return ti, joint, totals["first"] - k * (ti + joint)


def per_image(folder: Path, cfg: CustomizationConfig, device: str, n: int) -> float:
    """Seconds per image of n images sampled ``cfg.sample_batch`` to a call (after a 2-step warm-up call)."""
    pipe = load_stable_diffusion(str(folder), device=device)
    prompts = ["A charcoal sketch of a cat sitting on a rock."] * n
    warm = min(n, cfg.sample_batch)
    sample_many(pipe, prompts[:warm], list(range(warm)), cfg.model_copy(update={"inference_steps": 2}))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    sample_many(pipe, prompts, list(range(n)), cfg)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


# each of the first four rows adds one change to the row above; the last two are variants of the batched-sampling
# row (its joint phase as lora; torch.compile added); the customization flags are customize()'s speed-up switches
SETTINGS = [
    ("plain", dict(fused_attention=False, cache_text=False), dict(sample_batch=1)),
    ("+ fused attention", dict(fused_attention=True, cache_text=False), dict(sample_batch=1)),
    ("+ cached text encodings", dict(fused_attention=True, cache_text=True), dict(sample_batch=1)),
    ("+ batched sampling (4)", dict(fused_attention=True, cache_text=True), dict(sample_batch=4)),
    ("lora joint phase", dict(fused_attention=True, cache_text=True), dict(sample_batch=4, method="lora")),
    ("batched + torch.compile", dict(fused_attention=True, cache_text=True), dict(sample_batch=4, compile=True)),  # last: its compile is the longest
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny test models on any device (default without CUDA)")
    ap.add_argument("--steps", type=int, default=0, help="K of the 2K-minus-K step timing (default 10 GPU, 3 tiny)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of K and of 2K steps each, the least time kept")
    args = ap.parse_args()
    tiny = args.tiny or not torch.cuda.is_available()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    k = args.steps or (3 if tiny else 10)
    n_images = 4 if tiny else 8
    steps: dict[tuple, tuple[float, float, float]] = {}  # measured once per distinct customization setting
    images: dict[int, float] = {}  # and once per sampling batch
    anchor_min = (RECIPE["ti"] * ANCHOR["ti"] + RECIPE["joint"] * ANCHOR["joint"] + RECIPE["images"] * ANCHOR["image"]) / 60
    print(f"customization at {'tiny test size, CPU' if tiny else 'Stable Diffusion 2.1-base size, ' + torch.cuda.get_device_name()}"
          f" ({k} vs {2 * k} steps, least of {args.repeats}; {n_images} images; {'fp32' if device == 'cpu' else 'bf16 autocast'})")
    print(f"anchor (H100, plain bf16): {ANCHOR['ti']:.3f} s, {ANCHOR['joint']:.3f} s, {ANCHOR['image']:.3f} s/image: "
          f"{anchor_min:.2f} min/exemplar; goal <= 1 min")
    print(f"{'setting':26s} {'TI s/step':>10s} {'joint s/step':>13s} {'s/image':>9s} {'min/exemplar':>13s} "
          f"{'vs plain':>9s} {'vs H100 anchor':>15s} {'one-off s':>10s}", flush=True)  # each row as it is measured: a run cut short keeps its rows
    plain_minutes = None  # the first row, measured in this run: each row's speed-up against it
    with tempfile.TemporaryDirectory() as tmp:
        if tiny:
            from ardetect.generation.tiny import write_tiny_stable_diffusion

            folder = write_tiny_stable_diffusion(Path(tmp) / "sd")
            base = dict(resolution=32, attn_res=16, inference_steps=5)
        else:
            folder = write_sd21_size(Path(tmp))
            base = dict(resolution=512, attn_res=16, inference_steps=50)
        # the process's own first-call costs (kernel selection, allocator) would fall in the first setting's K run
        per_step(folder, CustomizationConfig(**base, device=device, prior_images=1), 1, device)
        for name, speedups, over in SETTINGS:
            cfg = CustomizationConfig(**base, **over, mixed_precision="bf16", device=device, prior_images=1)
            if cfg.compile and device == "cpu":
                print(f"{name:26s} {'not run on CPU (GPU only)':>52s}", flush=True)
                continue
            key = (cfg.method, cfg.compile, *sorted(speedups.items()))
            if key not in steps:
                steps[key] = per_step(folder, cfg, k, device, args.repeats, **speedups)
            if cfg.sample_batch not in images:
                images[cfg.sample_batch] = per_image(folder, cfg, device, n_images)
            ti, joint, once = steps[key]
            img = images[cfg.sample_batch]
            minutes = (RECIPE["ti"] * ti + RECIPE["joint"] * joint + RECIPE["images"] * img) / 60
            plain_minutes = plain_minutes or minutes
            # 2K steps no slower than K: the steps are too few to time against the machine's noise
            note = "  (2K steps took no longer than K: not a measurement, raise --steps)" if min(ti, joint) <= 0 else ""
            print(f"{name:26s} {ti:10.4f} {joint:13.4f} {img:9.3f} {minutes:13.2f} {plain_minutes / minutes:8.2f}x "
                  f"{anchor_min / minutes:14.2f}x {once:10.1f}{note}", flush=True)
    if tiny:
        print("GPU figures not measured: this run used the tiny test models on the CPU and checks the script only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
