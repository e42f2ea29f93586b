"""Square-root covariance pooling (MPN-COV / iSQRT-COV, Li et al. 2017, 2018), the pooling of the paper's B-LQF.

A feature map ``[B, d, H, W]`` becomes the upper triangle of ``√Σ``, where Σ is the covariance of its ``M = H·W``
d-dimensional feature vectors. The square root is iSQRT-COV's: trace pre-normalization, a fixed number of coupled
Newton–Schulz iterations (matrix products only, so it runs fast on a GPU), and post-compensation by ``√tr Σ``.
Every step is a plain differentiable tensor op, so reverse mode, forward mode (``torch.func.jvp``, the
``LinearizedNetwork`` of LQF) and ``vmap`` all go through it without a custom autograd function.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lqf_exp.options import POOLINGS

from .activations import ActivationFactory, make_activation

__all__ = ["POOLINGS", "SqrtCovPooling", "covariance", "sqrtm_newton_schulz", "upper_triangle"]



def covariance(x: Tensor) -> Tensor:
    """Per-sample covariance ``Σ = (1/M) X̄ X̄ᵀ`` of ``x [B, d, M]`` (X̄: the M columns centred), ``[B, d, d]``.

    Divided by M, not M − 1, as iSQRT-COV does; the trace normalization makes the choice immaterial to the
    normalized matrix, and post-compensation only rescales the output uniformly.
    """
    centred = x - x.mean(dim=2, keepdim=True)
    return centred @ centred.transpose(1, 2) / x.shape[2]


def sqrtm_newton_schulz(sigma: Tensor, iterations: int = 5) -> Tensor:
    """Approximate square root of the symmetric PSD matrices ``sigma [..., d, d]`` (iSQRT-COV's three steps).

    1. ``A = Σ / tr Σ``: the eigenvalues of A lie in [0, 1], the region where the iteration converges.
    2. Coupled Newton–Schulz from ``Y₀ = A, Z₀ = I``: ``T = (3I − Z Y)/2, Y ← Y T, Z ← T Z``; ``Y → √A`` and
       ``Z → 1/√A`` (the last step needs no Z). An eigenvalue a of A reaches its root in about
       ``log(1/a)/log(2.25)`` steps plus a few quadratic ones, so a handful of steps normalizes the large
       eigenvalues and leaves small ones only partly square-rooted — iSQRT-COV's design, not a bug; more
       ``iterations`` approach the exact root (see tests/test_pooling.py for the error at 5).
    3. ``√Σ ≈ √(tr Σ) · Y``.

    An all-zero Σ (every feature constant over the map) gives zeros: its trace is clamped to the smallest
    positive number, so nothing divides by zero and no NaN reaches the gradient.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"Newton-Schulz iterations must be an integer >= 1, got {iterations!r}")
    trace = torch.diagonal(sigma, dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(sigma.dtype).tiny)
    a = sigma / trace[..., None, None]
    three = 3.0 * torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    y, z = a, None  # Z₀ = I is never materialized: the first Z·Y is A itself
    for step in range(iterations):
        t = 0.5 * (three - (y if z is None else z @ y))
        if step < iterations - 1:
            z = t if z is None else t @ z
        y = y @ t
    return y * trace.sqrt()[..., None, None]


def upper_triangle(matrix: Tensor) -> Tensor:
    """The upper triangle (diagonal included) of ``matrix [B, d, d]``, row by row: ``[B, d(d+1)/2]``.

    A symmetric matrix loses nothing; the off-diagonal entries are not doubled, as in iSQRT-COV's ``Triuvec``.
    """
    d = matrix.shape[-1]
    rows, cols = torch.triu_indices(d, d, device=matrix.device)
    return matrix[:, rows, cols]


class SqrtCovPooling(nn.Module):
    """Drop-in for a ResNet's ``avgpool``: ``[B, C, H, W]`` → ``[B, d(d+1)/2]`` (the head's input, flattened).

    Args:
        in_channels: C, the channels of the last feature map (the old head's ``in_features``).
        reduce_dim: d. ``None``: no reduction, d = C. Otherwise a 1×1 convolution to d channels followed by
            BatchNorm and an activation, the reduction layer of MPN-COV / iSQRT-COV (2048 → 256 on ResNet-50):
            the BN keeps the reduced features at a trainable scale under NLFT (MPN-COV), and the activation is a
            module, so ``swap_activations`` gives it the network's activation (Leaky-ReLU under LQF) like every
            other one. Kept rather than a bare convolution so that ``model.pooling=sqrt_cov`` under NLFT *is*
            MPN-COV. The reduction is new — no packaged or ImageNet checkpoint has it — and stays at its seeded
            init until trained; under LQF its BN runs in eval mode with init statistics, i.e. as the identity.
        iterations: Newton–Schulz steps of :func:`sqrtm_newton_schulz` (iSQRT-COV uses 3 to 5).
        activation: factory of the reduction's activation (default ReLU; ``build_network`` swaps it anyway).
    """

    def __init__(
        self,
        in_channels: int,
        reduce_dim: int | None = None,
        iterations: int = 5,
        activation: ActivationFactory | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("reduce_dim", reduce_dim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"sqrt_cov pooling: {name} must be an integer >= 1, got {value!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"sqrt_cov pooling: iterations must be an integer >= 1, got {iterations!r}")
        self.in_channels = in_channels
        self.dim = in_channels if reduce_dim is None else reduce_dim
        self.iterations = iterations
        self.reduce: nn.Sequential | None = None
        if reduce_dim is not None:
            conv = nn.Conv2d(in_channels, reduce_dim, 1, bias=False)
            # MPN-COV's init (He, fan-out), the same rule as the convolutions of the ResNets it follows.
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            act = activation or make_activation("relu")
            self.reduce = nn.Sequential(conv, nn.BatchNorm2d(reduce_dim), act())

    @property
    def out_features(self) -> int:
        """d(d+1)/2, the ``in_features`` of the head that follows."""
        return self.dim * (self.dim + 1) // 2

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, dim={self.dim}, iterations={self.iterations}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"sqrt_cov pooling expects a [B, C, H, W] feature map, got shape {tuple(x.shape)}")
        if x.shape[2] * x.shape[3] < 2:
            # One position has a zero covariance: the pooled features would all be 0 whatever the input.
            raise ValueError(
                f"sqrt_cov pooling needs a feature map of at least 2 positions, got {x.shape[2]}x{x.shape[3]}; "
                "use larger input images (data.image_size) or model.pooling=avg"
            )
        if self.reduce is not None:
            x = self.reduce(x)
        sigma = covariance(x.flatten(2))
        return upper_triangle(sqrtm_newton_schulz(sigma, self.iterations))
