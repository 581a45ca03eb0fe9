"""The detector's candidate side exports to ONNX (plain-PyTorch deformable attention) and runs in onnxruntime."""

import numpy as np
import pytest
import torch

from ardetect.model.detector import QueryCache


class CandidateSide(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, text, token_mask, self_mask, position_ids, concept_mask):
        out = self.model(images, QueryCache(text, token_mask, self_mask, position_ids, concept_mask, concept_mask))
        return out.pred_logits, out.pred_boxes


@pytest.mark.slow
def test_nano_exports_and_matches_onnxruntime(nano, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    cache = nano.encode_query(torch.rand(1, 3, 160, 160), torch.tensor([[20.0, 30.0, 100.0, 120.0]]), ["a V* cat on a rock."], ["V* cat"])
    args = (torch.rand(2, 3, 160, 160), cache.text.detach(), cache.token_mask, cache.self_attn_mask, cache.position_ids, cache.concept_mask)
    wrapper = CandidateSide(nano).eval()
    path = tmp_path / "nano.onnx"
    torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    logits, boxes = session.run(None, feeds)
    with torch.no_grad():
        want_logits, want_boxes = wrapper(*args)
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(boxes, want_boxes.numpy(), atol=1e-4)
