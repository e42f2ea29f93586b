"""EKFAC (George et al., NeurIPS 2018): K-FAC's eigenbasis with eigenvalues corrected to the curvature's diagonal.

K-FAC approximates a layer's GGN block by ``G ⊗ A = (Q_G ⊗ Q_A) diag(λ_G ⊗ λ_A) (Q_G ⊗ Q_A)ᵀ``. EKFAC keeps that basis
and replaces the eigenvalues by the diagonal of the block in it,

    ``s[i, j] = R · Σ_n Σ_k ((Q_Gᵀ M_nk Q_A)[i, j])²``,  ``M_nk = Σ_p g_nkp a_npᵀ``,

where ``M_nk`` is the per-sample gradient of W̃ = (W b) for back-propagated vector k (the same vectors, scales and
normalization ``R`` as the ``G`` factor). For a conv, ``M_nk`` sums over the shared positions p — the true
per-sample gradient, not the expand approximation — which is why EKFAC repairs K-FAC's underestimate of
weight-sharing layers. With the type-2 vectors ``s`` is exactly ``diag((Q_G ⊗ Q_A)ᵀ GGN_block (Q_G ⊗ Q_A))``, the
best diagonal in that basis (Frobenius norm); for a block that is an exact Kronecker product it equals
``λ_G ⊗ λ_A``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from lqf_exp.losses import ClassificationLoss
from lqf_exp.precond.factors import (
    _UNFOLD_CHUNK,
    REDUCTIONS,
    LayerHookPass,
    _check_choice,
    input_rows,
    output_rows,
    sample_chunks,
)


def squared_rotated_gradients(g: Tensor, a: Tensor, Q_G: Tensor, Q_A: Tensor) -> Tensor:
    """``Σ_n (Q_Gᵀ M_n Q_A)²`` in float64 for ``M_n = Σ_p g[n, p] a[n, p]ᵀ``; ``g`` is ``(n, P, out)``, ``a``
    ``(n, P, in)``. Rotates the rows first when that is cheaper (few shared positions), else the gradients."""
    P, d_out, d_in = g.shape[1], Q_G.shape[0], Q_A.shape[0]
    if P * (d_out**2 + d_in**2) < d_out * d_in * (d_out + d_in):
        M = torch.einsum("npo,npi->noi", g @ Q_G, a @ Q_A)
    else:
        M = Q_G.T @ torch.einsum("npo,npi->noi", g, a) @ Q_A
    return M.square().sum(dim=0, dtype=torch.float64)


class EigenvalueCorrection(LayerHookPass):
    """Accumulates the EKFAC eigenvalues ``s`` of each layer in given Kronecker eigenbases over batches.

    ``bases`` maps every layer of ``layers`` to ``(Q_A, Q_G)``, the eigenvectors of its *final* K-FAC factors
    (e.g. a :class:`~lqf_exp.precond.inverse.KroneckerInverse`'s ``Q_A``/``Q_G``), on the activations' device; run
    it over the batches those factors came from, with the same ``loss``, ``fisher_type`` and ``mc_samples``.
    Hooks and backward vectors are :class:`LayerHookPass`'s; sums and the sample count all-reduce like the
    factors'. Per-sample gradients of a weight-sharing layer are formed ``chunk_elements``-bounded chunks of
    samples at a time (never for the whole batch of a big layer); a layer without weight sharing needs none.
    """

    def __init__(
        self,
        network: nn.Module,
        layers: Mapping[str, bool],
        loss: ClassificationLoss,
        bases: Mapping[str, tuple[Tensor, Tensor]],
        fisher_type: str = "type2",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        chunk_elements: int = _UNFOLD_CHUNK,
    ) -> None:
        super().__init__(network, layers, loss, fisher_type=fisher_type, mc_samples=mc_samples, generator=generator)
        if int(chunk_elements) < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        self.chunk_elements = int(chunk_elements)
        self.bases: dict[str, tuple[Tensor, Tensor]] = {}
        for name in self.modules:
            if name not in bases:
                raise ValueError(f"no eigenbasis (Q_A, Q_G) given for layer {name!r}")
            Q_A, Q_G = bases[name]
            d_in, d_out = self._factor_dim(name, True), self._factor_dim(name, False)
            if tuple(Q_A.shape) != (d_in, d_in) or tuple(Q_G.shape) != (d_out, d_out):
                raise ValueError(f"eigenbasis of layer {name!r} has Q_A {tuple(Q_A.shape)} and Q_G "
                                 f"{tuple(Q_G.shape)}, expected ({d_in}, {d_in}) and ({d_out}, {d_out})")
            self.bases[name] = (Q_A, Q_G)
        self.sums: dict[str, Tensor] = {}
        self._inputs: dict[str, Tensor] = {}  # this batch's layer inputs (raw, or rotated rows without sharing)

    def _stores(self) -> list[tuple[dict[str, Tensor], Callable[[str], tuple[int, ...]]]]:
        return [(self.sums, lambda n: (self._factor_dim(n, False), self._factor_dim(n, True)))]

    @staticmethod
    def _shares_weights(module: nn.Module, x: Tensor) -> bool:
        return isinstance(module, nn.Conv2d) or x.ndim > 2

    def _on_input(self, name: str, module: nn.Module, x: Tensor) -> None:
        if self._shares_weights(module, x):
            self._inputs[name] = x  # unfolded chunk by chunk in every backward pass
        else:  # rotate once per batch, not once per backward vector
            Q_A = self.bases[name][0].to(x.dtype)
            self._inputs[name] = input_rows(module, x, self.with_bias[name])[:, 0] @ Q_A

    def _on_output_grad(self, name: str, module: nn.Module, g: Tensor) -> None:
        Q_A, Q_G = (q.to(g.dtype) for q in self.bases[name])
        x = self._inputs[name]
        if not self._shares_weights(module, g):
            # rank-one per-sample gradients: the square of (Q_Gᵀ g)(Q_Aᵀ a)ᵀ is the outer product of the squares
            g_rot = g @ Q_G
            s = g_rot.square().T.to(torch.float64) @ x.square().to(torch.float64)
        else:
            g = output_rows(module, g)
            per_sample = g.shape[1] * (Q_A.shape[0] + Q_G.shape[0]) + 2 * Q_A.shape[0] * Q_G.shape[0]
            s = torch.zeros(Q_G.shape[0], Q_A.shape[0], dtype=torch.float64, device=g.device)
            chunks = zip(sample_chunks(x, per_sample, self.chunk_elements),
                         sample_chunks(g, per_sample, self.chunk_elements), strict=True)
            for x_chunk, g_chunk in chunks:
                s += squared_rotated_gradients(g_chunk, input_rows(module, x_chunk, self.with_bias[name]), Q_G, Q_A)
        self._add(self.sums, name, s.mul_(self._g_scale))

    def _end_batch(self) -> None:
        self._inputs = {}

    def finalize(self, reduction: str = "mean") -> dict[str, Tensor]:
        """``{layer: s}``, float64 ``(out, in[+1])``, normalized like the ``G`` factor (``R = 1/N`` for mean)."""
        _check_choice("reduction", reduction, REDUCTIONS)
        if self.count == 0:
            raise RuntimeError("no sample was accumulated: the EKFAC eigenvalues are undefined")
        missing = [name for name in self.modules if name not in self.sums]
        if missing:
            raise RuntimeError(f"layers {missing} were never reached by a forward pass: no EKFAC eigenvalues")
        return {name: self.sums[name] / (self.count if reduction == "mean" else 1.0) for name in self.modules}
