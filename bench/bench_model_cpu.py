"""CPU benchmark of the ``nano`` detector at the default world's resolution (160x160).

Measures, in one run:
1. training throughput: forward + backward (phase 1, surrogate loss over all outputs),
   samples per second, each sample its own query;
2. scoring throughput, forward only: candidates per second with the query side
   encoded once and broadcast over batched candidates, against recomputing the query
   side for every candidate (each candidate paired with its own copy of the query, as
   a detector with the signature F(X, p, Q, R_Q) does), and their ratio;
3. the same with the candidates' query-independent side (backbone + input projections,
   ``encode_images``) precomputed too, as a candidate index scoring many queries would;
4. the identity re-ranking (``identity_weight`` > 0, top 5 boxes pooled from the region
   maps) against the paper's score on the same precomputed candidates: its cost ratio.

Run: ``PYTHONPATH=src .venv/bin/python bench/bench_model_cpu.py [--threads N]``
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ardetect.model import ModelConfig, build  # noqa: E402

from _timing import apply_threads, parser_with_threads, timed, timed_interleaved  # noqa: E402  (bench/ is the script's folder)

PROMPT = "A charcoal sketch of a V* cat sitting on a rock."
CONCEPT = "V* cat"




def main() -> None:
    parser = parser_with_threads(__doc__)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=8, help="candidates per forward pass")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    apply_threads(args)
    torch.manual_seed(0)
    cfg = ModelConfig.named("nano")
    model = build(cfg)
    h, w = cfg.image_size
    print(f"nano at {h}x{w}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    # 1. forward + backward, phase 1
    b = args.train_batch
    q_img, q_box = torch.rand(b, 3, h, w), torch.tensor([[30.0, 40.0, 110.0, 130.0]]).expand(b, 4)
    targets = torch.rand(b, 3, h, w)
    model.set_phase(1).train()
    params = [p for p in model.parameters() if p.requires_grad]

    def train_step() -> None:
        for p in params:
            p.grad = None
        cache = model.encode_query(q_img, q_box, [PROMPT] * b, [CONCEPT] * b)
        out = model(targets, cache)
        loss = out.pred_logits.sigmoid().mean() + out.pred_boxes.mean()
        for aux in out.aux_outputs + [out.enc_outputs]:
            loss = loss + aux["pred_logits"].sigmoid().mean() + aux["pred_boxes"].mean()
        loss.backward()

    t_train = timed(train_step, args.repeats)
    print(f"train fwd+bwd   {b / t_train:8.2f} samples/s   ({t_train * 1000:.0f} ms per batch of {b})")

    # 2. forward only: cached query side vs recomputed per candidate
    model.eval()
    n, chunk = args.candidates, args.chunk
    cands = torch.rand(n, 3, h, w)
    one_img, one_box = q_img[:1], q_box[:1]

    @torch.no_grad()
    def cached() -> None:
        cache = model.encode_query(one_img, one_box, [PROMPT], [CONCEPT])
        for s in range(0, n, chunk):
            model.predict_region(cands[s : s + chunk], cache)

    @torch.no_grad()
    def recomputed() -> None:
        for s in range(0, n, chunk):
            k = min(chunk, n - s)
            cache = model.encode_query(one_img.expand(k, -1, -1, -1), one_box.expand(k, 4), [PROMPT] * k, [CONCEPT] * k)
            model.predict_region(cands[s : s + k], cache)

    with torch.no_grad():  # candidate side once, as an index of training images would hold it
        feats = model.encode_images(cands)
        feats_map = model.encode_images(cands, region_map=True)

    @torch.no_grad()
    def both_cached() -> None:
        cache = model.encode_query(one_img, one_box, [PROMPT], [CONCEPT])
        model.predict_region(feats, cache, chunk_size=chunk)

    # 3. the identity re-ranking (top-5 boxes pooled from the region maps) against the paper's score
    @torch.no_grad()
    def reranked() -> None:
        cache = model.encode_query(one_img, one_box, [PROMPT], [CONCEPT])
        model.predict_region(feats_map, cache, chunk_size=chunk, identity_weight=5.0, top_k=5)

    @torch.no_grad()
    def reranked_4x4() -> None:
        cache = model.encode_query(one_img, one_box, [PROMPT], [CONCEPT], region_map=True)
        model.predict_region(feats_map, cache, chunk_size=chunk, identity_weight=5.0, top_k=5, grid=4)

    # every scoring form timed in turn each round (medians), so that a slow spell of the machine hits all alike
    t = timed_interleaved({"cached": cached, "recomputed": recomputed, "both": both_cached, "reranked": reranked,
                           "reranked_4x4": reranked_4x4}, args.repeats)
    t_cached, t_recomp, t_both, t_rerank, t_rerank2 = (t[k] for k in ("cached", "recomputed", "both", "reranked", "reranked_4x4"))
    print(f"score cached    {n / t_cached:8.2f} candidates/s (query encoded once, {chunk} candidates per pass)")
    print(f"score recomputed{n / t_recomp:8.2f} candidates/s (query side recomputed for every candidate)")
    print(f"ratio cached/recomputed = {t_recomp / t_cached:.2f}x")
    print(f"score cached+index{n / t_both:6.2f} candidates/s (candidate backbone features also precomputed, "
          f"{t_recomp / t_both:.2f}x recomputed)")
    print(f"score re-ranked {n / t_rerank:8.2f} candidates/s (identity re-ranking, top 5 boxes; "
          f"cost against the paper's score = {t_rerank / t_both:.3f}x)")
    print(f"score re-ranked 4x4{n / t_rerank2:5.2f} candidates/s (4x4 region descriptors; "
          f"cost against the paper's score = {t_rerank2 / t_both:.3f}x)")


if __name__ == "__main__":
    main()
