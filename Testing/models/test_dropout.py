"""CpuDropout: nn.Dropout's behaviour with a cheaper CPU mask (engine.models.blocks)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from engine.config.pretrain import build_config
from engine.models.blocks import CpuDropout, keep_mask, with_cpu_dropout
from engine.models.hybridmim import HybridMIMPretrainer


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_each_element_is_dropped_with_probability_p_independently(p):
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([400_000, 4]), p)  # the 4 parts of one random word sit side by side in a row
    dropped = (~keep).double()
    sigma = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(float(dropped.mean()) - p) < 5 * sigma
    for part in range(4):  # each 16-bit part of the words, and pairs of them, as independent draws would be
        assert abs(float(dropped[:, part].mean()) - p) < 5 * 2 * sigma
    both = float((dropped[:, 0] * dropped[:, 1]).mean())
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / 400_000) ** 0.5


def test_same_seed_same_mask_and_each_call_a_new_mask():
    x = torch.ones(10_000)
    drop = CpuDropout(0.3).train()
    torch.manual_seed(3)
    first, second = drop(x), drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), first)
    assert not torch.equal(first, second)


def test_kept_elements_are_scaled_and_the_gradient_follows_the_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 64, requires_grad=True)
    y = CpuDropout(0.25).train()(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.75)
    assert abs(float(CpuDropout(0.25).train()(torch.ones(200_000)).mean()) - 1.0) < 0.01  # expectation kept


def test_eval_and_the_extremes_are_nn_dropouts():
    x = torch.randn(100)
    assert torch.equal(CpuDropout(0.5).eval()(x), x)
    assert torch.equal(CpuDropout(0.0).train()(x), x)
    assert torch.equal(CpuDropout(1.0).train()(x), torch.zeros(100))


def test_hybridmim_uses_it_everywhere_and_keeps_its_state_dict():
    cfg = build_config("tiny", "hybridmim", {"hybridmim.backbone": "unet"})
    model = HybridMIMPretrainer(cfg)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is CpuDropout and m.p == cfg.hybridmim.dropout for m in drops)
    plain = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))
    keys = list(plain.state_dict())
    assert list(with_cpu_dropout(plain).state_dict()) == keys and type(plain[1]) is CpuDropout
