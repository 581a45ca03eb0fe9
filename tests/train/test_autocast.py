"""bf16 autocast of the training forward: the forward runs in bf16, the losses and the weights stay fp32."""

from __future__ import annotations

import pytest
import torch

from ardetect.config import ConfigError
from ardetect.train.engine import TrainState, train_steps
from ardetect.train.pretrain import run_pretrain

from tiny_world import fast_config, objects_of


class Recorder(torch.nn.Module):
    """A linear 'detector' whose criterion records the dtypes it is handed."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.seen: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []

    def forward(self, batch):
        logits = self.linear(batch)
        return {"pred_logits": logits, "aux_outputs": [{"pred_logits": logits * 2}]}, torch.ones(1, dtype=torch.bool), None

    def criterion(self, outputs, targets, token_mask):
        self.seen.append((self.linear_dtype, outputs["pred_logits"].dtype, outputs["aux_outputs"][0]["pred_logits"].dtype))
        return {"loss": outputs["pred_logits"].square().mean() + outputs["aux_outputs"][0]["pred_logits"].mean()}


def run(autocast):
    torch.manual_seed(0)
    model = Recorder()
    original = model.linear.forward

    def linear_forward(x):  # the dtype the matmul itself computes in
        out = original(x)
        model.linear_dtype = out.dtype
        return out

    model.linear.forward = linear_forward
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = ((i, torch.randn(2, 4, generator=torch.Generator().manual_seed(i))) for i in range(3))
    stats = train_steps(model.criterion, optimizer, batches, model, 3, TrainState(), epoch=0, clip_grad=0.0, autocast=autocast)
    return model, stats


def test_autocast_runs_the_forward_in_bf16_and_the_losses_in_fp32():
    model, stats = run(torch.bfloat16)
    assert model.seen == [(torch.bfloat16, torch.float32, torch.float32)] * 3  # the nested outputs are cast back too
    assert model.linear.weight.dtype == torch.float32 and torch.isfinite(torch.tensor(stats["loss"]))
    plain, plain_stats = run(None)
    assert plain.seen == [(torch.float32, torch.float32, torch.float32)] * 3
    assert not torch.equal(model.linear.weight, plain.linear.weight)  # bf16 rounding moved the steps
    assert torch.allclose(model.linear.weight, plain.linear.weight, atol=0.05)


def test_precision_setting_is_checked():
    with pytest.raises(ConfigError, match="precision"):
        fast_config(pretrain={"precision": "fp16"})


@pytest.mark.slow
def test_bf16_pretraining_trains_fp32_weights(tiny_world, tmp_path):
    tuples, root = tiny_world
    objects = objects_of(tuples)
    kw = {"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 3, "absent_classes": 2, "classify_epochs": 0, "region_classifier_epochs": None}
    fp32, _ = run_pretrain(fast_config(pretrain=kw), objects, tuples, root, tmp_path / "fp32")
    bf16, history = run_pretrain(fast_config(pretrain={**kw, "precision": "bf16"}), objects, tuples, root, tmp_path / "bf16")
    assert history[-1]["epoch"] == 1 and torch.isfinite(torch.tensor(history[-1]["train_loss"]))
    a, b = fp32.state_dict(), bf16.state_dict()
    assert all(v.dtype == a[k].dtype for k, v in b.items())  # the weights stay fp32
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    saved = torch.load(tmp_path / "bf16" / "model.pt", weights_only=False)
    assert saved["pretrain"]["precision"] == "bf16"
