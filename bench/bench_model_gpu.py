"""GPU benchmark: ``B-B`` at 800x1333, candidates per second against transformers' GroundingDINO.

Both models are built in the same run with the same random weights (ours converted
from transformers' with ``from_transformers_state_dict``, region tokens on), at the
same input size, batch and precision. Ours encodes the query side (text encoder,
query-image backbone, region token) once and scores batches of candidates against
it; transformers' model runs its whole forward per batch. Printed: images per second
of each, and their ratio, for eager PyTorch, with the candidates' backbone features
also precomputed (``encode_images``, as a candidate index scoring many queries holds
them), and (``--compile``) for our model under ``torch.compile``.

Run on the device machine (no venv there): ``PYTHONPATH=src python3 bench/bench_model_gpu.py``.
``--tiny`` runs a small config on any device to check the script.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig  # noqa: E402

from ardetect.model import build  # noqa: E402
from ardetect.model.convert import from_transformers_state_dict, load_converted  # noqa: E402

PROMPT = "A charcoal sketch of a V* cat sitting on a rock."
CONCEPT = "V* cat"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def hf_config(tiny: bool) -> GroundingDinoConfig:
    if tiny:
        bb = SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4, image_size=64, out_indices=[2, 3, 4])
        text = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        return GroundingDinoConfig(backbone_config=bb, text_config=text, d_model=64, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                   decoder_ffn_dim=128, num_queries=20, max_text_len=32)
    # B-B: Swin-B (window 12, 384 pretraining) + BERT-base, GroundingDINO's defaults otherwise
    bb = SwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12, image_size=384, out_indices=[2, 3, 4])
    return GroundingDinoConfig(backbone_config=bb, text_config=BertConfig())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(fn, n_images: int, device: torch.device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return n_images * iters / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["bf16", "autocast", "fp32"], default="bf16",
                   help="bf16: weights and activations in bf16; autocast: fp32 weights under bf16 autocast")
    p.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    p.add_argument("--profile", action="store_true", help="print our forward's 15 most expensive kernels")
    p.add_argument("--tokenizer", default=None, help="folder of a bert-base-uncased tokenizer")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    h, w = (64, 64) if args.tiny else (args.height, args.width)
    b = args.batch
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{'tiny' if args.tiny else 'B-B'} at {h}x{w}, batch {b}, {args.precision}", flush=True)

    cfg_hf = hf_config(args.tiny)
    t0 = time.perf_counter()
    hf = GroundingDinoForObjectDetection(cfg_hf).eval()
    overrides = dict(image_size=(h, w))
    if args.tokenizer:
        overrides["tokenizer"] = args.tokenizer
    cfg, state = from_transformers_state_dict(hf.state_dict(), cfg_hf, **overrides)
    ours = build(cfg).eval()
    load_converted(ours, state)
    print(f"built both in {time.perf_counter() - t0:.1f} s; parameters: transformers "
          f"{sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M, ours {sum(p.numel() for p in {id(p): p for p in ours.parameters()}.values()) / 1e6:.1f}M",
          flush=True)

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    hf.to(device=device, dtype=dtype)
    ours.to(device=device, dtype=dtype)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "autocast" else contextlib.nullcontext())

    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, h, w, generator=g).to(device)
    pixel_values = ((images - torch.tensor(MEAN, device=device).view(1, 3, 1, 1)) / torch.tensor(STD, device=device).view(1, 3, 1, 1)).to(dtype)
    tok = ours.tokenizer([PROMPT] * b, return_tensors="pt")
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    query_image = torch.rand(1, 3, h, w, generator=g).to(device)
    query_box = torch.tensor([[0.2 * w, 0.2 * h, 0.7 * w, 0.8 * h]], device=device)

    results: dict[str, float] = {}
    with torch.inference_mode(), autocast:
        def run_hf() -> None:
            hf(pixel_values=pixel_values, input_ids=ids, attention_mask=mask)

        results["transformers"] = rate(run_hf, b, device, args.iters, args.warmup)
        print(f"transformers GroundingDINO   {results['transformers']:8.1f} images/s", flush=True)
        if device.type == "cuda":  # the peak printed below is ours alone, not the maximum over both models
            print(f"peak GPU memory, transformers {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
            torch.cuda.reset_peak_memory_stats()

        cache = ours.encode_query(query_image, query_box, [PROMPT], [CONCEPT])

        def run_ours() -> None:
            ours(images, cache)

        results["ours"] = rate(run_ours, b, device, args.iters, args.warmup)
        print(f"ours, query cached           {results['ours']:8.1f} candidates/s  "
              f"ratio {results['ours'] / results['transformers']:.2f}x", flush=True)

        feats = ours.encode_images(images)  # query-independent candidate side, as a candidate index holds it
        results["ours_index"] = rate(lambda: ours(feats, cache), b, device, args.iters, args.warmup)
        print(f"ours, query + candidate features cached {results['ours_index']:8.1f} candidates/s  "
              f"ratio {results['ours_index'] / results['transformers']:.2f}x", flush=True)

        # the query side itself, amortised over the candidates of one query
        t_q = 1.0 / rate(lambda: ours.encode_query(query_image, query_box, [PROMPT], [CONCEPT]), 1, device, args.iters, 1)
        print(f"query side (encode_query)    {t_q * 1000:8.1f} ms once per query", flush=True)
        n_cand = 104  # the default world's candidates per query at evaluation
        per_query = n_cand / results["ours"] + t_q
        print(f"one query x {n_cand} candidates   {n_cand / per_query:8.1f} candidates/s including the query side", flush=True)

        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                run_ours()
                sync(device)
            key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60), flush=True)

        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"peak GPU memory, ours {peak:.1f} GiB", flush=True)

    if args.compile:
        compiled = torch.compile(ours.forward)
        t = time.perf_counter()
        with torch.inference_mode(), autocast:
            compiled(images, cache)
            sync(device)
            print(f"compile + first call {time.perf_counter() - t:.0f} s", flush=True)
            results["ours_compiled"] = rate(lambda: compiled(images, cache), b, device, args.iters, args.warmup)
        print(f"ours, compiled, query cached {results['ours_compiled']:8.1f} candidates/s  "
              f"ratio {results['ours_compiled'] / results['transformers']:.2f}x", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
