"""A small CIFAR-style ResNet (about 78k parameters) that trains in minutes on a couple of CPU cores."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .activations import ActivationFactory, make_activation


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (projection shortcut when the shape changes).

    Each activation is its own module and the residual sum is out-of-place, so the block has no
    in-place or functional activation: ``swap_activations`` controls every non-linearity and
    ``torch.func.jvp`` / backward hooks see plain modules.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, act: ActivationFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1 = act()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.act2 = act()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + identity)


class SmallResNet(nn.Module):
    """3x3 stem (16 ch) + three one-block stages (16/32/64 ch, stride 1/2/2) + avg pool + ``fc``.

    Submodules are named as in torchvision (``conv1, bn1, layer1, layer2, layer3, fc``), so the same
    block names work as "linearize from here" points for every architecture.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        in_channels: int = 3,
        activation: ActivationFactory | None = None,
    ) -> None:
        super().__init__()
        if len(widths) != 3 or any(int(w) < 1 for w in widths):
            raise ValueError(f"SmallResNet widths must be three positive ints, got {list(widths)}")
        act = activation or make_activation("relu")
        w1, w2, w3 = (int(w) for w in widths)
        self.conv1 = nn.Conv2d(in_channels, w1, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.act = act()
        self.layer1 = BasicBlock(w1, w1, 1, act)
        self.layer2 = BasicBlock(w1, w2, 2, act)
        self.layer3 = BasicBlock(w2, w3, 2, act)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init for ReLU-family nets, as torchvision's ResNet does.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))
