"""The LQF objective, its gradients and its exact curvature products, on mini-batches and on the full data.

``L(δ) = mean_n ℓ(f0(x_n) + J_n δ, y_n) + (λ/2)‖δ‖²`` for a :class:`~lqf_exp.linearize.LinearizedNetwork`, a loss
that owns its output-space curvature and λ. Its Hessian is ``H = (1/N) Σ_n J_nᵀ H_n J_n + λI`` with ``H_n`` the loss
Hessian at the linearized outputs (constant ``2I`` for the MSE loss, so L is then an exact quadratic). A curvature
product needs one forward-mode pass for ``J v`` and, when a vector result is needed, one reverse pass for ``Jᵀu``.

Vectors are lists of tensors shaped like ``net.delta_list()``; reductions (dots, sums over the data) are float64.
Under data parallelism every sum over samples goes through ``reduce_sum`` (an all-reduce), so all ranks agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lqf_exp.curvature import Preconditioner
from lqf_exp.delta_layout import flat_size, flatten, unflatten
from lqf_exp.jacobian_cache import JacobianCache
from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.losses import ClassificationLoss

Vectors = list[Tensor]
Batch = tuple[Tensor, Tensor]

__all__ = ["Evaluation", "LQFObjective", "Vectors", "axpy", "dot", "flatten", "norm", "unflatten", "zeros_like"]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """``⟨a, b⟩`` in float64."""
    return float(sum((u.double() * v.double()).sum() for u, v in zip(a, b, strict=True)))


def norm(a: Sequence[Tensor]) -> float:
    return dot(a, a) ** 0.5


def zeros_like(a: Sequence[Tensor], dtype: torch.dtype | None = None) -> Vectors:
    return [torch.zeros_like(t, dtype=dtype) for t in a]


def axpy(alpha: float, x: Sequence[Tensor], y: Sequence[Tensor]) -> Vectors:
    """``α x + y`` as a new list."""
    return [alpha * u.to(v.dtype) + v for u, v in zip(x, y, strict=True)]


@dataclass
class Evaluation:
    """The objective over the full training data at the current δ, and optionally its gradient."""

    objective: float
    gradient: Vectors | None = None

    @property
    def grad_norm(self) -> float | None:
        return None if self.gradient is None else norm(self.gradient)


class LQFObjective:
    """``L(δ)`` of LQF with its gradients and curvature products (see the module docstring).

    ``preconditioner`` (set later by :meth:`attach`) maps target layers to ``(C + γI)⁻¹``; δs outside those layers
    keep the identity. ``reduce_sum`` sums a tensor over data-parallel ranks (identity for one process).
    With a :class:`~lqf_exp.jacobian_cache.JacobianCache` attached (:meth:`attach_cache`), the full-data
    quantities (:meth:`evaluate`, :meth:`hvp`) are products with the stored Jacobian and ignore their batches.
    """

    def __init__(
        self,
        net: LinearizedNetwork,
        loss: ClassificationLoss,
        weight_decay: float,
        reduce_sum: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not weight_decay >= 0:
            raise ValueError(f"the weight decay λ must be >= 0, got {weight_decay}")
        self.net, self.loss, self.weight_decay = net, loss, float(weight_decay)
        self.deltas: Vectors = list(net.delta_list())
        self.reduce_sum = reduce_sum or (lambda t: t)
        self.preconditioner: Preconditioner | None = None
        self.cache: JacobianCache | None = None
        names = net.linearized_names
        slot = {name: i for i, name in enumerate(names)}
        self._layers = {
            layer: (slot[f"{layer}.weight"], slot.get(f"{layer}.bias"))
            for layer in net.curvature_layers()
        }

    # -- vectors and preconditioning -------------------------------------------------------------------------
    def attach(self, preconditioner: Preconditioner | None) -> None:
        self.preconditioner = preconditioner

    def attach_cache(self, cache: JacobianCache | None) -> None:
        self.cache = cache

    @property
    def in_memory(self) -> bool:
        """True when full-data quantities come from the Jacobian cache (no network pass)."""
        return self.cache is not None

    def precondition(self, vectors: Sequence[Tensor]) -> Vectors:
        """``P v``: the preconditioner on its layers, the identity elsewhere (and everywhere without one)."""
        out = [v.clone() for v in vectors]
        if self.preconditioner is None:
            return out
        by_layer = {layer: (vectors[w], None if b is None else vectors[b]) for layer, (w, b) in self._layers.items()}
        for layer, (pw, pb) in self.preconditioner.precondition(by_layer).items():
            w, b = self._layers[layer]
            out[w] = pw.to(vectors[w].dtype)
            if b is not None and pb is not None:
                out[b] = pb.to(vectors[b].dtype)
        return out

    def penalty(self, vectors: Sequence[Tensor]) -> float:
        """``(λ/2)‖v‖²`` (a number: gradients of the penalty are added in closed form)."""
        return 0.5 * self.weight_decay * sum(float(v.detach().double().pow(2).sum()) for v in vectors)

    def _count(self, n: int, device: torch.device) -> float:
        return float(self.reduce_sum(torch.tensor(float(n), dtype=torch.float64, device=device)))

    # -- mini-batch (a list of batches: one step may span several loader batches) ------------------------------
    def batch_gradient(self, batches: Sequence[Batch]) -> tuple[float, Vectors, list[Tensor]]:
        """``(L_B(δ), ∇L_B(δ), [f_lin(x) per batch])`` for the union B of ``batches`` (all ranks' shares):
        the mean loss over B plus the penalty."""
        count = self._count(sum(len(y) for _, y in batches), self.deltas[0].device)
        total = torch.zeros((), dtype=torch.float64, device=self.deltas[0].device)
        flat = torch.zeros(flat_size(self.deltas), dtype=self.deltas[0].dtype, device=total.device)
        outputs = []
        for x, y in batches:
            with torch.enable_grad():
                logits = self.net(x)
                data = self.loss.per_sample(logits, y).sum() / count
                grads = torch.autograd.grad(data, self.deltas)
            flat += flatten(grads)
            total += data.detach().double()
            outputs.append(logits.detach())
        grads = unflatten(self.reduce_sum(flat), self.deltas)
        value = float(self.reduce_sum(total)) + self.penalty(self.deltas)
        return value, axpy(self.weight_decay, self.deltas, grads), outputs

    def data_gradient(self, x: Tensor, y: Tensor) -> tuple[Vectors, Tensor]:
        """``Σ_n ∇_δ ℓ_n`` over this rank's batch (unreduced, float64) and the per-sample losses."""
        with torch.enable_grad():
            per_sample = self.loss.per_sample(self.net(x), y)
            grads = torch.autograd.grad(per_sample.sum(), self.deltas)
        return [g.double() for g in grads], per_sample.detach()

    @torch.no_grad()
    def jvp(self, x: Tensor, vectors: Sequence[Tensor]) -> Tensor:
        """``J(x; w0) v``, ``[B, C]``."""
        return self.net.jvp(x, [v.to(d.dtype) for v, d in zip(vectors, self.deltas, strict=True)])[1]

    @torch.no_grad()
    def curvature_gram(self, batches: Sequence[Batch], outputs: Sequence[Tensor],
                       directions: Sequence[Sequence[Tensor]], jvps: Sequence[Sequence[Tensor]]) -> Tensor:
        """``[d_iᵀ H_B d_j]`` (float64, CPU) over the union of ``batches``, given ``J d_i`` per batch
        (``jvps[i][b]``) and the outputs at which the loss Hessian is taken (``outputs[b]``)."""
        k = len(directions)
        device = outputs[0].device
        data = torch.zeros(k, k, dtype=torch.float64, device=device)
        for b, logits in enumerate(outputs):
            for i in range(k):
                hv = self.loss.hessian_vector(logits, jvps[i][b]).double()
                for j in range(i, k):
                    data[i, j] += (hv * jvps[j][b].double()).sum()
        count = self._count(sum(len(y) for _, y in batches), device)
        gram = (self.reduce_sum(data) / count).cpu()
        gram = torch.triu(gram) + torch.triu(gram, 1).T
        for i in range(k):
            for j in range(k):
                gram[i, j] += self.weight_decay * dot(directions[i], directions[j])
        return gram

    @torch.no_grad()
    def objective_along(self, batches: Sequence[Batch], outputs: Sequence[Tensor], step: Sequence[Tensor],
                        jvp_step: Sequence[Tensor]) -> float:
        """``L_B(δ + s)`` from the outputs at δ and ``J s`` per batch (no network pass)."""
        device = outputs[0].device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for (_, y), logits, js in zip(batches, outputs, jvp_step, strict=True):
            total += self.loss.per_sample(logits + js, y).sum().double()
        count = self._count(sum(len(y) for _, y in batches), device)
        shifted = [d + s.to(d.dtype) for d, s in zip(self.deltas, step, strict=True)]
        return float(self.reduce_sum(total)) / count + self.penalty(shifted)

    # -- full data -------------------------------------------------------------------------------------------
    def evaluate(self, batches: Iterable[Batch], gradient: bool = False) -> Evaluation:
        """``L(δ)`` over ``batches`` (this rank's share of the training data), and ``∇L(δ)`` if asked."""
        if self.cache is not None:
            return self._evaluate_cached(gradient)
        total = torch.zeros((), dtype=torch.float64)
        grad = zeros_like(self.deltas, torch.float64) if gradient else None
        count = 0
        for x, y in batches:
            count += len(y)
            with torch.set_grad_enabled(gradient):
                logits = self.net(x)
                data = self.loss.per_sample(logits, y).sum()
            if grad is not None:
                for acc, g in zip(grad, torch.autograd.grad(data, self.deltas), strict=True):
                    acc.add_(g)
            total += data.detach().double().cpu()
        n = self._count(count, self.deltas[0].device)
        value = float(self.reduce_sum(total.to(self.deltas[0].device))) / n + self.penalty(self.deltas)
        if grad is None:
            return Evaluation(value)
        flat = self.reduce_sum(flatten(grad)) / n
        return Evaluation(value, axpy(self.weight_decay, self.deltas, unflatten(flat, self.deltas)))

    def data_hvp(self, batches: Iterable[Batch], vectors: Sequence[Tensor]) -> tuple[Vectors, int]:
        """``Σ_n J_nᵀ H_n J_n v`` over ``batches`` (this rank's share, unreduced, float64) and the sample count.

        The loss Hessian is taken at the current linearized outputs (it does not depend on them for MSE).
        """
        v = [t.to(d.dtype).detach().requires_grad_(True) for t, d in zip(vectors, self.deltas, strict=True)]
        out = zeros_like(self.deltas, torch.float64)
        count = 0
        for x, y in batches:
            count += len(y)
            with torch.enable_grad():
                primal, tangent = self.net.jvp(x, v)
            with torch.no_grad():
                logits = primal + self.jvp(x, self.deltas) if not self.loss.constant_curvature else primal
                u = self.loss.hessian_vector(logits, tangent.detach())
            for acc, g in zip(out, torch.autograd.grad(tangent, v, grad_outputs=u), strict=True):
                acc.add_(g)
        return out, count

    def hvp(self, batches: Iterable[Batch], vectors: Sequence[Tensor]) -> Vectors:
        """``H v`` over the full data (all ranks), float64."""
        if self.cache is not None:
            return self._hvp_cached(vectors)
        data, count = self.data_hvp(batches, vectors)
        n = self._count(count, self.deltas[0].device)
        flat = self.reduce_sum(flatten(data)) / n
        return axpy(self.weight_decay, vectors, unflatten(flat, self.deltas))

    # -- full data from the Jacobian cache -------------------------------------------------------------------
    def cached_outputs(self) -> Tensor:
        """``f_lin`` of every training sample, ``[N, C]`` (float64), from the cache."""
        assert self.cache is not None
        return self.cache.base.double() + self.cache.jvp(flatten([d.detach() for d in self.deltas]))

    def data_hvp_block(self, block: Tensor) -> Tensor:
        """``H_d v`` (float64) from the Jacobian cache for a flat direction ``[P]`` or a block of them ``[P, k]``:
        a block costs about one matrix product with J in each direction, however many columns it has."""
        assert self.cache is not None
        directions = self.cache.jvp(block)
        logits = self.cache.base.double() if self.loss.constant_curvature else self.cached_outputs()
        if block.dim() == 2:
            logits = logits[..., None].expand_as(directions)
        return self.cache.vjp(self.loss.hessian_vector(logits, directions) / self.cache.samples)

    def precondition_block(self, block: Tensor) -> Tensor:
        """``P V`` for a block of flat directions ``[P, k]`` (float64), column by column."""
        columns = [flatten(self.precondition(unflatten(block[:, i].to(self.deltas[0].dtype), self.deltas)))
                   for i in range(block.shape[1])]
        return torch.stack(columns, 1).double()

    def _evaluate_cached(self, gradient: bool) -> Evaluation:
        assert self.cache is not None
        logits = self.cached_outputs().requires_grad_(gradient)
        with torch.set_grad_enabled(gradient):
            data = self.loss.per_sample(logits, self.cache.labels).sum() / self.cache.samples
        value = float(data.detach()) + self.penalty(self.deltas)
        if not gradient:
            return Evaluation(value)
        (outer,) = torch.autograd.grad(data, logits)
        grads = unflatten(self.cache.vjp(outer), self.deltas)
        return Evaluation(value, axpy(self.weight_decay, [d.detach() for d in self.deltas], grads))

    def _hvp_cached(self, vectors: Sequence[Tensor]) -> Vectors:
        data = self.data_hvp_block(flatten([v.detach() for v in vectors]))
        return axpy(self.weight_decay, vectors, unflatten(data, self.deltas))
