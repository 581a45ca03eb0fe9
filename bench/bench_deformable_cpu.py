"""CPU benchmark of the detector's multi-scale deformable attention against the textbook formulation.

The reference is Deformable DETR's plain-PyTorch formulation: sampling points laid out
[B, Q, H, L, P, 2], each level sampled with ``grid_sample`` into [B*H, Dh, Q, P], all
levels stacked into [B*H, Dh, Q, L*P], multiplied by the attention weights and summed.
Ours (``ardetect.model.layers``) lays the points out level-major with the queries last
and accumulates each point's weighted samples in place, so no [.., L*P] product is ever
materialised. Both run on the same module and inputs; the script checks they agree and
prints the time of each and their ratio, at the sizes of one evaluation chunk of the
``nano`` detector (64 candidates, 534 image tokens at 160 px) and of one training batch.

A second reference is our own earlier form, for training: the same in-place sum with one
slice per point (``sampled[:, :, p]``), whose backward fills a zero tensor of the whole
[B*H, Dh, P, Q] per point and adds the P of them up. Ours takes the points from ``unbind``,
whose backward stacks their gradients once; the two give the same numbers bit for bit
(``tests/model/test_model_layers.py``), so the script checks equality, not closeness.
The training batch's forward+backward of both is timed interleaved (round by round) and
their ratio printed.

Run: ``PYTHONPATH=src .venv/bin/python bench/bench_deformable_cpu.py [--threads N]``
"""

from __future__ import annotations


from unittest import mock

import torch
import torch.nn.functional as F

from ardetect.model import layers
from ardetect.model.layers import DeformableAttention

from _timing import apply_threads, parser_with_threads, timed, timed_interleaved  # noqa: E402  (bench/ is the script's folder)


def reference_forward(attn: DeformableAttention, query, reference_points, value, shapes):
    """The textbook formulation on ``attn``'s weights (the reference of this benchmark)."""
    b, nq, d = query.shape
    nh, nl, npt = attn.num_heads, attn.num_levels, attn.num_points
    v = attn.value_proj(value).view(b, -1, nh, d // nh)
    offsets = attn.sampling_offsets(query).view(b, nq, nh, nl, npt, 2)
    weights = attn.attention_weights(query).view(b, nq, nh, nl * npt).softmax(-1)
    if reference_points.shape[-1] == 2:
        norm = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype)
        loc = reference_points[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
    else:
        loc = reference_points[:, :, None, :, None, :2] + offsets / npt * reference_points[:, :, None, :, None, 2:] * 0.5
    grids = 2 * loc - 1
    per_level = v.split([h * w for h, w in shapes], dim=1)
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        vl = per_level[lvl].permute(0, 2, 3, 1).reshape(b * nh, d // nh, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * nh, nq, npt, 2)
        sampled.append(F.grid_sample(vl, g, mode="bilinear", padding_mode="zeros", align_corners=False))  # [B*H, Dh, Q, P]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [B*H, Dh, Q, L*P]
    w = weights.transpose(1, 2).reshape(b * nh, 1, nq, nl * npt)
    out = (stacked * w).sum(-1).view(b, d, nq).transpose(1, 2)
    return attn.output_proj(out)



def per_point_slices():
    """Our earlier sampling sum, one slice per point (the second reference, for the backward): the form the
    shipped one is held equal to, bit for bit, by ``tests/model/test_model_layers.py``, read from there."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tests" / "model" / "test_model_layers.py"
    spec = importlib.util.spec_from_file_location("_test_model_layers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.per_point_slices


def slices_against_unbind(attn: DeformableAttention, shapes, tokens: int, dim: int, levels: int, repeats: int) -> None:
    """Forward+backward of a training batch with the per-point slices and with ours, checked equal, timed interleaved."""
    x = torch.randn(8, tokens, dim, requires_grad=True)
    ref = torch.rand(8, tokens, levels, 2)
    slices_form = per_point_slices()

    def step(slices: bool):
        attn.zero_grad(set_to_none=True)
        x.grad = None
        if slices:
            with mock.patch.object(layers, "multi_scale_deformable_attention", slices_form):
                out = attn(x, ref, x, None, shapes)
        else:
            out = attn(x, ref, x, None, shapes)
        (out * out).sum().backward()
        return [out.detach(), x.grad.clone(), *(p.grad.clone() for p in attn.parameters())]

    ours, theirs = step(False), step(True)
    if not all(torch.equal(a, b) for a, b in zip(ours, theirs)):
        raise SystemExit("encoder, batch 8: the per-point slices and ours differ (they must be equal bit for bit)")
    t = timed_interleaved({"ours": lambda: step(False), "slices": lambda: step(True)}, repeats * 4)
    print(f"{'encoder, batch 8, forward+backward':38s} ours {t['ours'] * 1000:7.1f} ms   per-point slices {t['slices'] * 1000:7.1f} ms   "
          f"ratio ours/slices = {t['ours'] / t['slices']:.2f}   (equal bit for bit; medians of {repeats * 4} interleaved rounds)")


def main() -> None:
    parser = parser_with_threads(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    apply_threads(args)
    torch.manual_seed(0)
    dim, heads, levels, points = 64, 4, 4, 4  # the nano detector
    shapes = [(20, 20), (10, 10), (5, 5), (3, 3)]  # 160 x 160 input
    tokens = sum(h * w for h, w in shapes)
    attn = DeformableAttention(dim, heads, levels, points)
    with torch.no_grad():  # trained-looking offsets and weights, not the initial ones
        attn.sampling_offsets.weight.normal_(0, 0.05)
        attn.attention_weights.weight.normal_(0, 0.1)
    print(f"deformable attention, nano sizes ({tokens} image tokens), torch {torch.__version__}, {torch.get_num_threads()} threads")
    for label, batch, grad in (("encoder, 64 candidates, forward", 64, False), ("encoder, batch 8, forward+backward", 8, True)):
        x = torch.randn(batch, tokens, dim, requires_grad=grad)
        ref = torch.rand(batch, tokens, levels, 2)
        ours_fn = lambda: attn(x, ref, x, None, shapes)  # noqa: E731
        theirs_fn = lambda: reference_forward(attn, x, ref, x, shapes)  # noqa: E731
        with torch.no_grad():
            diff = (ours_fn() - theirs_fn()).abs().max().item()
        if diff > 1e-4:
            raise SystemExit(f"{label}: the two formulations differ by {diff:.2e}")

        def run(fn):
            if not grad:
                with torch.no_grad():
                    return fn()
            out = fn()
            out.sum().backward()
            return out

        t_ours = timed(lambda: run(ours_fn), args.repeats)
        t_ref = timed(lambda: run(theirs_fn), args.repeats)
        print(f"{label:38s} ours {t_ours * 1000:7.1f} ms   reference {t_ref * 1000:7.1f} ms   "
              f"ratio reference/ours = {t_ref / t_ours:.2f}x   (max abs difference {diff:.1e})")
    slices_against_unbind(attn, shapes, tokens, dim, levels, args.repeats)


if __name__ == "__main__":
    main()
