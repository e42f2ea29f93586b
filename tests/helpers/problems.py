"""A small float64 LQF problem with its optimum in closed form, for solver and influence tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lqf_exp.delta_layout import copy_flat_, flat_size, flatten
from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.losses import ScaledMSELoss
from lqf_exp.solvers import LQFObjective

from .nets import randomize_bn, tiny_cnn_net

ALPHA = 15.0


@dataclass
class SmallProblem:
    """``n`` 8×8 images of ``classes`` classes through a linearized tiny CNN (Leaky-ReLU), in float64."""

    net: LinearizedNetwork
    x: Tensor
    y: Tensor
    loss: ScaledMSELoss
    weight_decay: float

    def objective(self) -> LQFObjective:
        return LQFObjective(self.net, self.loss, self.weight_decay)

    def batches(self, size: int) -> list[tuple[Tensor, Tensor]]:
        return list(zip(self.x.split(size), self.y.split(size), strict=True))

    def jacobian(self) -> Tensor:
        """``[N·C, P]``."""
        return self.net.jacobian(self.x).reshape(-1, flat_size(self.net.delta_list()))

    def optimum(self) -> Tensor:
        """δ* of ``(1/N)‖r − Jδ‖² + (λ/2)‖δ‖²`` by a dense primal solve (flat)."""
        J = self.jacobian()
        with torch.no_grad():
            r = (self.loss.targets(self.y, 3, torch.float64) - self.net.apply_to_base(self.x)).reshape(-1)
        n = len(self.y)
        H = (2.0 / n) * J.T @ J + self.weight_decay * torch.eye(J.shape[1], dtype=J.dtype)
        return torch.linalg.solve(H, (2.0 / n) * J.T @ r)

    def delta(self) -> Tensor:
        return flatten([d.detach() for d in self.net.delta_list()])

    def set_delta(self, flat: Tensor | None) -> None:
        deltas = self.net.delta_list()
        copy_flat_(torch.zeros(flat_size(deltas), dtype=deltas[0].dtype) if flat is None else flat, deltas)


def small_problem(n: int = 36, weight_decay: float = 1e-2, seed: int = 0, width: int = 3) -> SmallProblem:
    torch.manual_seed(seed)
    net = randomize_bn(tiny_cnn_net(nn.LeakyReLU, width=width), seed).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(n) % 3
    return SmallProblem(LinearizedNetwork(net), x, y, ScaledMSELoss(ALPHA), weight_decay)
