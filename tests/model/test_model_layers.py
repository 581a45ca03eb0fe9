"""The multi-scale deformable attention's sampling sum: the same numbers as its plain per-point form."""

import pytest
import torch
import torch.nn.functional as F

from ardetect.model.layers import multi_scale_deformable_attention

SHAPES = [(8, 8), (4, 4), (2, 2), (1, 1)]


def per_point_slices(value, shapes, grids, weights):
    """The same sum written with one slice per point (``x[:, :, p]``), the form whose backward fills a whole
    zero tensor per point: the reference the shipped form must equal bit for bit."""
    b, _, nh, dh = value.shape
    _, _, _, npt, nq, _ = grids.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids, weights = grids.to(value.dtype), weights.to(value.dtype)
    out = None
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(b * nh, dh, h, w)
        sampled = F.grid_sample(v, grids[lvl].reshape(b * nh, npt, nq, 2), mode="bilinear", padding_mode="zeros", align_corners=False)
        wl = weights[lvl].reshape(b * nh, 1, npt, nq)
        for p in range(npt):
            if out is None:
                out = sampled[:, :, p] * wl[:, :, p]
            else:
                out.addcmul_(sampled[:, :, p], wl[:, :, p])
    return out.view(b, nh * dh, nq).transpose(1, 2).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_sum_and_its_gradients_equal_the_per_point_form_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    b, nh, dh, npt, nq = 3, 4, 8, 4, 21
    tokens = sum(h * w for h, w in SHAPES)
    value = torch.randn(b, tokens, nh, dh, generator=g).to(dtype)
    grids = (torch.rand(len(SHAPES), b, nh, npt, nq, 2, generator=g) * 2.4 - 1.2).to(dtype)  # some points outside the map
    weights = torch.rand(len(SHAPES), b, nh, npt, nq, generator=g).to(dtype)
    upstream = torch.randn(b, nq, nh * dh, generator=g).to(dtype)
    found = []
    for fn in (multi_scale_deformable_attention, per_point_slices):
        inputs = [t.clone().requires_grad_(True) for t in (value, grids, weights)]
        out = fn(inputs[0], SHAPES, inputs[1], inputs[2])
        out.backward(upstream)
        found.append((out.detach(), *(t.grad for t in inputs)))
    for name, ours, reference in zip(("output", "value grad", "grids grad", "weights grad"), *found):
        assert ours.dtype == reference.dtype == dtype, name
        assert ours.abs().sum() > 0, f"{name} is all zero: the check would hold for nothing"
        assert torch.equal(ours, reference), f"{name}: largest difference {(ours.float() - reference.float()).abs().max():.3e}"
