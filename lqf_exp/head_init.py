"""Initialization of the base head around which LQF linearizes.

The head must not be zero: every backbone direction of the Jacobian passes through it. ``init_head`` fits a probe
on the frozen penultimate features — the loss fits it (:meth:`lqf_exp.losses.ClassificationLoss.fit_head`: ridge
regression for MSE, logistic regression for CE) — or draws a random head.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lqf_exp.head_fit import PROBE_L2_GRID, HeadFit, ValidatedHeadFit, fit_head_on_validation
from lqf_exp.losses import ClassificationLoss
from lqf_exp.models.heads import head_name as network_head_name
from lqf_exp.options import HEAD_INITS

__all__ = ["HEAD_INIT_KINDS", "check_head_init_kind", "extract_features", "fit_validated_head", "init_head"]

HEAD_INIT_KINDS = HEAD_INITS
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


def _resolve(net: nn.Module, head_name: str | None) -> str:
    """``head_name``, or, when None, the head the network declares (``fc`` for ResNets, ``head`` for the ViT)."""
    return network_head_name(net) if head_name is None else head_name


def _head(net: nn.Module, head_name: str) -> nn.Linear:
    head = getattr(net, head_name, None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"net.{head_name} must be an nn.Linear head, got {type(head).__name__}")
    return head


@torch.no_grad()
def extract_features(
    net: nn.Module, loader: Iterable, device: torch.device | str | None = None, head_name: str | None = None
) -> tuple[Tensor, Tensor]:
    """Penultimate features (the input of ``net.<head_name>``; by default the network's own head) at the current
    weights, eval mode, no grad.

    ``loader`` yields ``(x, y)`` batches. Runs on ``device`` (default: the device of ``net``); returns CPU
    tensors ``features [N, D]`` and ``labels [N]``. The training mode of ``net`` is restored afterwards.
    """
    head_name = _resolve(net, head_name)
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


def init_head(
    net: nn.Module,
    loader: Iterable | None = None,
    kind: str = "probe",
    loss: ClassificationLoss | None = None,
    l2: float | None = None,
    device: torch.device | str | None = None,
    head_name: str | None = None,
) -> HeadFit | None:
    """Write the head ``net.<head_name>`` in place; return the fit (``None`` for a random head).

    ``kind="probe"``: ``loss.fit_head`` on the frozen features of ``loader`` — for MSE the ridge regression onto
    ``α·onehot`` (the "LQF FC" optimum), for CE a logistic regression; ``l2=None`` lets the loss choose the penalty
    (MSE: exact leave-one-out). ``kind="random"``: PyTorch's default ``nn.Linear`` initialization (global RNG).
    ``"zero"`` or anything else raises ``ValueError``.
    """
    check_head_init_kind(kind)
    head_name = _resolve(net, head_name)
    head = _head(net, head_name)
    if kind == "random":
        head.reset_parameters()
        return None
    if loader is None or loss is None:
        raise ValueError("init_head(kind='probe') needs a loader and the loss whose head it fits")
    if head.bias is None:
        raise ValueError(f"net.{head_name} has no bias; the probe head fits one (unpenalized)")
    feats, labels = extract_features(net, loader, device, head_name)
    fit = loss.fit_head(feats, labels, head.out_features, l2)
    with torch.no_grad():
        head.weight.copy_(fit.weight)
        head.bias.copy_(fit.bias)
    return fit


def fit_validated_head(
    net: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    loss: ClassificationLoss,
    grid: tuple[float, ...] = PROBE_L2_GRID,
    device: torch.device | str | None = None,
    head_name: str | None = None,
) -> ValidatedHeadFit:
    """Write into ``net.<head_name>`` the head that ``loss.fit_head`` gives on the frozen features of
    ``train_loader`` with the ``l2`` of ``grid`` whose head has the lowest mean ``loss`` on ``val_loader``: the
    linear probe solved to its optimum, its one hyper-parameter chosen on validation."""
    head_name = _resolve(net, head_name)
    head = _head(net, head_name)
    if head.bias is None:
        raise ValueError(f"net.{head_name} has no bias; the probe head fits one (unpenalized)")
    feats, labels = extract_features(net, train_loader, device, head_name)
    val_feats, val_labels = extract_features(net, val_loader, device, head_name)
    if len(val_labels) == 0:
        raise ValueError("choosing the probe's l2 on validation needs a non-empty validation split")

    def validation_loss(fit: HeadFit) -> float:
        logits = val_feats.double() @ fit.weight.double().T + fit.bias.double()
        return float(loss.per_sample(logits, val_labels).mean())

    chosen = fit_head_on_validation(lambda l2: loss.fit_head(feats, labels, head.out_features, l2), validation_loss,
                                    grid)
    with torch.no_grad():
        head.weight.copy_(chosen.fit.weight)
        head.bias.copy_(chosen.fit.bias)
    return chosen
