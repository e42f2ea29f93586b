"""The first-call check of a :class:`~lqf_exp.linearize.LinearizedNetwork`, on its first real batch.

Two things cannot be read off the module tree and are checked numerically, once:

- the split into a frozen prefix and the rest: ``net(x)`` must equal the rest (prefix children replaced by
  identities) applied to the prefix's output, i.e. the prefix children run first, in registration order, as a chain;
- the fused tangent: the dual modules see modules, not what a ``forward`` computes between them, so a non-linearity
  called as a function (``F.gelu``) would give a wrong tangent. It is compared with forward-mode AD along a random
  direction (δ is often zero). A float32 mismatch is looked at again in float64 before it counts: a pre-activation
  within rounding of a ReLU/Leaky-ReLU kink can take the other slope in one path (one Fashion-MNIST validation image
  gave 2.5e-3 in float32 and 8e-16 in float64), which is rounding, not a missing rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["check_prefix_split", "tangent_mismatch"]

# (f(x; w0), J(x; w0)·v) for tangents v
JVP = Callable[[Sequence[Tensor]], tuple[Tensor, Tensor]]

# max |fused − autodiff| / max |autodiff| allowed, by output dtype
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _relative_error(got: Tensor, want: Tensor) -> float:
    return float((got - want).abs().max()) / (float(want.abs().max()) or 1.0)


@torch.no_grad()
def check_prefix_split(net: nn.Module, prefix: nn.Module, suffix: nn.Module, first_block: str, x: Tensor) -> None:
    """Raise if ``suffix(prefix(x))`` is not ``net(x)``: the frozen children do not form a prefix."""
    with torch.autocast(x.device.type, enabled=False):
        want, got = net(x), suffix(prefix(x))
    if got.shape != want.shape or _relative_error(got, want) > _TOLERANCE.get(want.dtype, 1e-4):
        children = [n for n, _ in net.named_children()]
        raise RuntimeError(
            f"the frozen children before {first_block!r} (registration order {children}) do not form a prefix of the "
            "network: some run after the first linearized child, or their outputs are not chained in that order, so "
            "net(x) is not the linearized blocks applied to their output. Choose an earlier block or 'all'.")


@torch.no_grad()
def tangent_mismatch(fused: JVP, autodiff: JVP, like: Sequence[Tensor], device: torch.device) -> str | None:
    """Why the fused path's ``(f(x; w0), J·v)`` does not match forward-mode AD along a random direction ``v``
    (shaped like ``like``), in the parameters' precision; None where it matches. The caller decides what a mismatch
    means (look again in float64, warn and leave the fused path, or raise)."""
    generator = torch.Generator(device=device).manual_seed(0)
    direction = [torch.randn(d.shape, generator=generator, device=d.device, dtype=d.dtype) * 1e-2 for d in like]
    # The check is about the rules, not rounding: no autocast, and no TF32 (on by default for CUDA convolutions,
    # whose ~1e-3 rounding would otherwise trip the float32 tolerance and switch tangent=auto off the fused path).
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.autocast(device.type, enabled=False), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            got, want = fused(direction), autodiff(direction)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    for what, a, b in zip(("f(x; w0)", "J(x; w0)·v"), got, want, strict=True):
        error, tolerance = _relative_error(a, b), _TOLERANCE.get(b.dtype, 1e-4)
        if not error <= tolerance:
            return (f"tangent='fused' gives {what} {error:.2e} (relative) away from forward-mode AD (tolerance "
                    f"{tolerance:.0e}): the network computes something the fused rules do not see (e.g. a "
                    "functional non-linearity inside a forward).")
    return None
