"""Small networks shared by the tests (torchvision-like child names, BatchNorm with non-trivial statistics)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def randomize_bn(net: nn.Module, seed: int = 0, shift: float = 0.0) -> nn.Module:
    """Give BatchNorm non-trivial statistics and affine parameters, as a pretrained net would have."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(1 + 0.2 * torch.randn(c, generator=g))
            m.bias.data.copy_(shift + 0.2 * torch.randn(c, generator=g))
    return net


def tiny_cnn_net(act: type[nn.Module] = nn.ReLU, width: int = 4, classes: int = 3) -> nn.Module:
    """conv1, bn1, act, layer1, layer2, pool, flatten, fc: torchvision-like child names, in call order."""
    blocks = OrderedDict(conv1=nn.Conv2d(3, width, 3, padding=1), bn1=nn.BatchNorm2d(width), act=act())
    blocks["layer1"] = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), act())
    blocks["layer2"] = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), act())
    blocks.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(width, classes))
    return nn.Sequential(blocks)
