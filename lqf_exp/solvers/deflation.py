"""Krylov recycling: the CG directions of one solve deflate the next solves of the same curvature.

Every λ of the validation path solves ``(H_d + λI) x = b`` with the same data curvature ``H_d = (1/N) Σ Jᵀ H_ℓ J``
(constant for the MSE loss). A CG solve computes ``H p`` for every search direction ``p`` it takes; kept with the
direction (as ``H_d p = H p − λp``, which holds for any λ), they give ``W`` and ``A W = H_d W + λ' W`` for the next λ'
with no further product. A two-level preconditioner then solves exactly on ``span(W)`` and applies the usual one
(K-FAC, fixed or tied to λ) to the rest: the balancing form of deflation (Mandel's BNN; Tang, Nabben, Vuik &
Erlangga, J. Sci. Comput. 2009, compare it with deflated CG), so the directions an earlier solve paid for (the stiff,
outlying part of the spectrum K-FAC leaves) are not paid for again. The space is bounded by ``max_gb``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lqf_exp.solvers.objective import Vectors, flatten, unflatten

__all__ = ["Deflation", "KrylovSpace", "sketch_dominant_subspace"]

# Directions of curvature below this many rounding units of the largest in span(W) (1.2e-3 for products computed
# in float32, 2e-12 in float64) are left to the preconditioned iteration.
_RELIABLE_ULPS = 1e4


class Deflation:
    """``W`` (``[P, k]``), ``AW`` and the pseudo-inverse of ``E = WᵀAW`` for one operator ``A = H_d + λI``."""

    def __init__(self, basis: Tensor, products: Tensor, weight_decay: float, eps: float = 2.0**-52) -> None:
        # An orthonormal basis of span(W) first: directions from several solves (or late, rounded iterations of
        # one) are close to dependent, and E = WᵀAW would be too ill-conditioned to invert. With orthonormal
        # columns E ⪰ λI, so its inverse is as well-conditioned as A itself.
        values, vectors = torch.linalg.eigh(basis.T @ basis)
        keep = values > 1e-12 * values.max().clamp_min(1e-300)
        rotation = vectors[:, keep] / values[keep].sqrt()
        self.basis = basis @ rotation
        self.products = (products + weight_decay * basis) @ rotation
        # Keep the stiff part only: products computed in float32 (a cached Jacobian, a float32 network; ``eps`` is
        # their rounding unit) carry errors of many ulps of λmax(A), which would swamp a Galerkin solve in directions
        # of curvature near λ (a solve of the smoke task blew up). Those are the directions the preconditioned
        # iteration handles well anyway; the stiff ones are the point.
        gram = self.basis.T @ self.products
        values, vectors = torch.linalg.eigh(0.5 * (gram + gram.T))
        stiff = values > _RELIABLE_ULPS * eps * values.max().clamp_min(1e-300)
        self.basis, self.products = self.basis @ vectors[:, stiff], self.products @ vectors[:, stiff]
        self.inverse = torch.diag(1.0 / values[stiff])

    @property
    def size(self) -> int:
        return self.basis.shape[1]

    def balance(self, precondition: Callable[[Tensor], Tensor], vector: Tensor) -> Tensor:
        """The balancing (BNN) preconditioner ``(I − QA) M (I − AQ) v + Q v`` with ``Q = W E⁻¹ Wᵀ``.

        It is symmetric positive definite for any SPD ``M`` even when the stored ``AW`` is inexact, so CG stays a
        monotone descent method; a projected iteration (deflated CG proper) is not, and diverged on float32
        products. On ``span(W)`` it is ``A⁻¹`` exactly; elsewhere it is ``M`` seen through the projections.
        """
        coarse = self.inverse @ (self.basis.T @ vector)
        smoothed = precondition(vector - self.products @ coarse)
        return smoothed - self.basis @ (self.inverse @ (self.products.T @ smoothed)) + self.basis @ coarse


    def preconditioner(self, precondition: Callable[[Vectors], Vectors]) -> Callable[[Vectors], Vectors]:
        """:meth:`balance` around ``precondition`` (e.g. K-FAC) on the solvers' vectors (lists of tensors)."""

        def inner(flat: Tensor, like: Vectors) -> Tensor:
            return flatten(precondition(unflatten(flat, like))).double()

        def balanced(vectors: Vectors) -> Vectors:
            return unflatten(self.balance(lambda flat: inner(flat, vectors), flatten(vectors).double()), vectors)

        return balanced


class KrylovSpace:
    """Directions and their data-curvature products collected from solves (flat float64), up to ``max_gb``."""

    def __init__(self, max_gb: float = 1.0) -> None:
        if not max_gb >= 0:
            raise ValueError(f"solver.recycle_gb must be >= 0, got {max_gb!r}")
        self.max_bytes = int(max_gb * 2**30)
        self.directions: list[Tensor] = []
        self.products: list[Tensor] = []
        self.eps = 0.0  # the coarsest rounding unit of the products kept
        self.sketched = False  # a sketch of the dominant subspace seeded it

    def __len__(self) -> int:
        return len(self.directions)

    def add_block(self, directions: Tensor, data_products: Tensor, eps: float) -> None:
        """Keep the columns of ``directions`` (``[P, k]``) with their data-curvature products ``H_d W``, while
        there is room (a sketch of the dominant subspace: :func:`sketch_dominant_subspace`)."""
        room = self.max_bytes // (2 * directions.shape[0] * 8) - len(self)
        for column in range(min(room, directions.shape[1])):
            self.eps = max(self.eps, eps)
            self.directions.append(directions[:, column].double().clone())
            self.products.append(data_products[:, column].double().clone())

    def add(self, direction: Tensor, product: Tensor, weight_decay: float, eps: float = 2.0**-52) -> None:
        """Keep ``p`` and ``H_d p = Hp − λp`` (``product`` is ``Hp`` at λ = ``weight_decay``, computed with rounding
        unit ``eps``), while there is room."""
        if (len(self) + 1) * 2 * direction.numel() * 8 > self.max_bytes:
            return
        self.eps = max(self.eps, eps)
        self.directions.append(direction.detach().double().clone())
        self.products.append(product.detach().double() - weight_decay * self.directions[-1])

    def deflation(self, weight_decay: float) -> Deflation | None:
        """The deflation of ``H_d + λI`` by everything kept, or None while nothing is."""
        if not self.directions:
            return None
        return Deflation(torch.stack(self.directions, 1), torch.stack(self.products, 1), weight_decay, self.eps)


def sketch_dominant_subspace(data_product: Callable[[Tensor], Tensor], precondition: Callable[[Tensor], Tensor],
                             size: int, rank: int, iterations: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(W, H_d W)``: an orthonormal ``[size, rank]`` basis close to the dominant eigenvectors of ``P·H_d``, by
    randomized subspace iteration (Halko, Martinsson & Tropp 2011), and its data-curvature products.

    ``data_product`` and ``precondition`` act on blocks ``[size, k]`` (float64). Those eigenvectors are the stiff
    directions K-FAC misjudges, which set the iteration count of preconditioned CG; deflating them through
    :class:`Deflation` cut the CG iterations to a 1% gap on digits from ~130 to ~22 at λ = 1 and from ~60 to ~12
    at λ = 1e-3 (rank 256, two iterations; rank 128 and one iteration, the default, cost a third as much for a few
    more iterations: benchmarks/README.md). It costs ``iterations + 1`` block products.
    """
    generator = torch.Generator().manual_seed(seed)
    block = torch.randn(size, rank, generator=generator, dtype=torch.float64)
    for _ in range(iterations):
        block = precondition(data_product(torch.linalg.qr(block).Q))
    basis = torch.linalg.qr(block).Q
    return basis, data_product(basis)
