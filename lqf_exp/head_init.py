"""Initialization of the base head around which LQF linearizes.

The head must not be zero: every backbone direction of the Jacobian passes through it. ``init_head`` fits a probe
on the frozen penultimate features (ridge regression for MSE, logistic regression for CE) or draws a random head.
Conventions follow the losses of ``lqf_exp``: MSE is the batch mean of ``Σ_c (f_c − α·onehot_c)²``, and an L2
coefficient ``λ`` adds ``(λ/2)·‖W‖²`` (what SGD's ``weight_decay=λ`` does); biases are never penalized.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HEAD_INIT_KINDS", "check_head_init_kind", "extract_features", "fit_ce_head", "init_head", "ridge_head"]

HEAD_INIT_KINDS = ("probe", "random")
_ZERO_HEAD_MSG = (
    "A zero head makes the Jacobian of the output with respect to every backbone weight zero (each backbone "
    "direction passes through the head), so only the head would learn. Use kind='probe' or 'random'."
)


def check_head_init_kind(kind: str) -> None:
    """Refuse any head initialization but ``probe``/``random``; a zero head gets the reason spelled out."""
    if kind == "zero":
        raise ValueError(f"head init kind 'zero' is not allowed. {_ZERO_HEAD_MSG}")
    if kind not in HEAD_INIT_KINDS:
        raise ValueError(f"Unknown head init kind {kind!r}; valid: 'probe', 'random'. {_ZERO_HEAD_MSG}")


def _head(net: nn.Module, head_name: str) -> nn.Linear:
    head = getattr(net, head_name, None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"net.{head_name} must be an nn.Linear head, got {type(head).__name__}")
    return head


@torch.no_grad()
def extract_features(
    net: nn.Module, loader: Iterable, device: torch.device | str | None = None, head_name: str = "fc"
) -> tuple[Tensor, Tensor]:
    """Penultimate features (the input of ``net.<head_name>``) at the current weights, eval mode, no grad.

    ``loader`` yields ``(x, y)`` batches. Runs on ``device`` (default: the device of ``net``); returns CPU
    tensors ``features [N, D]`` and ``labels [N]``. The training mode of ``net`` is restored afterwards.
    """
    head = _head(net, head_name)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    feats: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, inp: feats.append(inp[0].flatten(1).cpu()))
    was_training = net.training
    net.eval()
    labels: list[Tensor] = []
    try:
        for batch in loader:
            x, y = batch[0], batch[1]
            net(x.to(device))
            labels.append(torch.as_tensor(y).cpu())
    finally:
        handle.remove()
        net.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def ridge_head(
    features: Tensor, labels: Tensor, num_classes: int, target_scale: float = 15.0, l2: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Closed-form head minimizing ``mean_n ‖W f_n + b − α·onehot(y_n)‖² + (l2/2)·‖W‖²`` (bias unpenalized).

    Solved in float64; returns ``(weight [C, D], bias [C])`` in the dtype of ``features``.
    """
    X = features.detach().to(torch.float64).flatten(1)
    N, D = X.shape
    T = target_scale * F.one_hot(labels.long().cpu(), num_classes).to(X)
    mu_x, mu_t = X.mean(0), T.mean(0)
    Xc, Tc = X - mu_x, T - mu_t
    # Normal equations of the centred problem, multiplied by N: (XcᵀXc + N·l2/2·I) Wᵀ = XcᵀTc.
    # With l2 = 0 the system may be singular (D ≥ N): take the minimum-norm least-squares solution instead.
    A = Xc.T @ Xc + (N * l2 / 2) * torch.eye(D, dtype=X.dtype)
    Wt = torch.linalg.solve(A, Xc.T @ Tc) if l2 > 0 else torch.linalg.lstsq(Xc, Tc, driver="gelsd").solution
    bias = mu_t - mu_x @ Wt
    return Wt.T.contiguous().to(features.dtype), bias.to(features.dtype)


def fit_ce_head(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    steps: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """Logistic-regression head: full-batch L-BFGS from zero on ``CE + (weight_decay/2)·‖W‖²`` (deterministic).

    Returns ``(weight [C, D], bias [C])`` in the dtype of ``features``.
    """
    X = features.detach().to(torch.float64).flatten(1)
    y = labels.long().cpu()
    # Standardize for conditioning; the scale is folded back into W and b at the end.
    mu, sd = X.mean(0), X.std(0, unbiased=False).clamp_min(1e-12)
    Z = (X - mu) / sd
    W = torch.zeros(num_classes, X.shape[1], dtype=X.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=X.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=lr, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        Wx = W / sd  # penalty on the weight in the original feature coordinates
        loss = F.cross_entropy(Z @ W.T + b, y) + weight_decay / 2 * Wx.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        weight = W / sd
        bias = b - weight @ mu
    return weight.to(features.dtype), bias.to(features.dtype)


def init_head(
    net: nn.Module,
    loader: Iterable | None = None,
    kind: str = "probe",
    loss_kind: str = "mse",
    target_scale: float = 15.0,
    l2: float = 1e-4,
    device: torch.device | str | None = None,
    head_name: str = "fc",
    ce_steps: int = 100,
) -> nn.Module:
    """Write the head ``net.<head_name>`` in place and return ``net``.

    ``kind="probe"``: fit on the frozen features of ``loader`` — ridge regression onto ``target_scale·onehot`` for
    ``loss_kind="mse"`` (the "LQF FC" optimum), logistic regression for ``"ce"``. ``kind="random"``: PyTorch's
    default ``nn.Linear`` initialization (global RNG). ``"zero"`` or anything else raises ``ValueError``.
    """
    check_head_init_kind(kind)
    if loss_kind not in ("mse", "ce"):
        raise ValueError(f"Unknown loss_kind {loss_kind!r}; valid: 'mse', 'ce'")
    head = _head(net, head_name)
    if kind == "random":
        head.reset_parameters()
        return net
    if loader is None:
        raise ValueError("init_head(kind='probe') needs a loader")
    if head.bias is None:
        raise ValueError(f"net.{head_name} has no bias; the probe head fits one (unpenalized)")
    feats, labels = extract_features(net, loader, device, head_name)
    C = head.out_features
    if loss_kind == "mse":
        weight, bias = ridge_head(feats, labels, C, target_scale=target_scale, l2=l2)
    else:
        weight, bias = fit_ce_head(feats, labels, C, steps=ce_steps, weight_decay=l2)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return net
