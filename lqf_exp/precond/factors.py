"""K-FAC Kronecker factors of the generalized Gauss-Newton matrix for ``Linear`` and ``Conv2d`` layers.

For a layer with W̃ = (W b) viewed as ``(out, in+1)`` (PyTorch's row-major flattening) the curvature block is
``G ⊗ A`` with ``A`` built from the layer inputs (a 1 appended when the bias is preconditioned) and ``G`` from
vectors back-propagated to the layer outputs. Scaling, for a loss ``R · Σ_n ℓ(f(x_n), y_n)``:

* ``A = (1/N) Σ_n a_n a_nᵀ`` (for weight-sharing layers ``a_n a_nᵀ`` is averaged over the shared positions in the
  ``expand`` approximation, or ``a_n`` is averaged before the outer product in ``reduce``);
* ``G = R · Σ_n Σ_k g_nk g_nkᵀ`` where ``g_nk`` back-propagates the k-th column of a square root of the per-sample
  loss Hessian (unscaled by R); ``R = 1/N`` for ``reduction="mean"`` (the project's losses) and 1 for ``"sum"``.

Sums and the sample count are accumulated separately so that a distributed all-reduce of both gives exactly the
factors of one process that saw all the data. The hooks and the back-propagated vectors live in
:class:`LayerHookPass`, which the EKFAC eigenvalue correction (:mod:`lqf_exp.precond.ekfac`) reuses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lqf_exp.losses import ClassificationLoss
from lqf_exp.options import FISHER_TYPES, KFAC_APPROXES

REDUCTIONS = ("mean", "sum")

# Unfolded conv inputs are processed in chunks of at most this many elements, to bound peak memory.
_UNFOLD_CHUNK = 2**26


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    """Numeric (symmetric) padding of a conv, so that ``F.unfold`` reproduces its patches."""
    if module.padding_mode != "zeros":
        raise NotImplementedError(f"K-FAC supports padding_mode='zeros' only, got {module.padding_mode!r}")
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise NotImplementedError("K-FAC does not support asymmetric 'same' padding")
        return (total[0] // 2, total[1] // 2)
    return tuple(module.padding)  # type: ignore[return-value]


def check_layer(name: str, module: nn.Module) -> None:
    """Raise a clear error for a layer K-FAC cannot handle."""
    if not isinstance(module, nn.Linear | nn.Conv2d):
        raise TypeError(f"K-FAC handles nn.Linear and nn.Conv2d only; {name!r} is {type(module).__name__}")
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise NotImplementedError(f"K-FAC supports Conv2d with groups=1 only; {name!r} has groups={module.groups}")
        _conv_padding(module)


def input_rows(module: nn.Module, x: Tensor, with_bias: bool) -> Tensor:
    """``(N, P, in[+1])`` layer inputs per sample and shared position (conv: the unfolded patches, in the order of
    ``weight.view(out, -1)``; linear: the positions of a >2-d input), a 1 appended when the bias is included."""
    if isinstance(module, nn.Conv2d):
        rows = F.unfold(x, kernel_size=module.kernel_size, dilation=module.dilation, padding=_conv_padding(module),
                        stride=module.stride).transpose(1, 2)
    else:
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1) if with_bias else rows


def output_rows(module: nn.Module, g: Tensor) -> Tensor:
    """``(N, P, out)`` vectors at the layer outputs, positions aligned with :func:`input_rows`."""
    return g.flatten(2).transpose(1, 2) if isinstance(module, nn.Conv2d) else g.reshape(g.shape[0], -1, g.shape[-1])


def sample_chunks(x: Tensor, elements_per_sample: int, budget: int = _UNFOLD_CHUNK) -> tuple[Tensor, ...]:
    """``x`` split along samples so that each chunk's derived tensors hold at most ``budget`` elements."""
    return x.split(max(1, budget // max(1, elements_per_sample)))


class LayerHookPass:
    """One forward pass and one backward pass per output-space vector over a batch, with hooks on chosen
    ``Linear``/``Conv2d`` layers: the machinery shared by the K-FAC factors and the EKFAC eigenvalue correction.

    ``layers`` maps a module name of ``network`` to whether its bias is preconditioned. ``loss`` supplies the
    output-space vectors (columns of its Hessian square root, sampled or empirical gradients); subclasses receive
    each layer input in :meth:`_on_input` and each back-propagated vector at the layer output in
    :meth:`_on_output_grad` (weighted by ``self._g_scale``), and name their summed statistics in :meth:`_stores`
    so that :meth:`all_reduce` sums them and the sample count over processes. No parameter's ``.grad`` is touched.
    """

    def __init__(
        self,
        network: nn.Module,
        layers: Mapping[str, bool],
        loss: ClassificationLoss,
        fisher_type: str = "type2",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(loss, ClassificationLoss):
            raise TypeError(f"K-FAC needs a lqf_exp.losses.ClassificationLoss (it owns its output-space curvature), "
                            f"got {type(loss).__name__}")
        _check_choice("fisher_type", fisher_type, FISHER_TYPES)
        if int(mc_samples) < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        if not layers:
            raise ValueError("K-FAC needs at least one layer to precondition")
        self.network, self.loss, self.fisher_type = network, loss, fisher_type
        self.mc_samples, self.generator = int(mc_samples), generator
        self.modules: dict[str, nn.Module] = {}
        for name in layers:
            module = network.get_submodule(name)
            check_layer(name, module)
            self.modules[name] = module
        self.with_bias = {name: bool(b) for name, b in layers.items()}
        self.count = 0
        self._g_scale = 1.0
        self._calls: dict[str, int] = {}
        self._anchors: list[Tensor] = []

    # -- what subclasses accumulate ---------------------------------------------------------------------------
    def _on_input(self, name: str, module: nn.Module, x: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _on_output_grad(self, name: str, module: nn.Module, g: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _stores(self) -> list[tuple[dict[str, Tensor], Callable[[str], tuple[int, ...]]]]:  # pragma: no cover
        """Each summed statistic as ``(per-layer sums, shape of a layer's sum)``."""
        raise NotImplementedError

    @staticmethod
    def _add(store: dict[str, Tensor], name: str, value: Tensor) -> None:
        if name in store:
            store[name].add_(value)
        else:
            store[name] = value

    def _forward_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            self._calls[name] = self._calls.get(name, 0) + 1
            if self._calls[name] > 1:
                raise NotImplementedError(f"layer {name!r} is called more than once per forward (weight tying)")
            with torch.no_grad():
                self._on_input(name, module, inputs[0].detach())
            # A zero anchor makes the output differentiable even when the network is frozen (LQF's w0), and a
            # tensor hook (not a module backward hook) survives in-place activations that follow the layer.
            anchor = output.new_zeros((), requires_grad=True)
            self._anchors.append(anchor)
            out = output + anchor
            out.register_hook(lambda g: self._on_output_grad(name, module, g.detach()))
            return out

        return hook

    # -- back-propagated vectors ------------------------------------------------------------------------------
    def _backward_vectors(self, f: Tensor, y: Tensor | None) -> tuple[Tensor, float]:
        """``(K, N, C)`` vectors whose outer products average to the loss Hessian, and the scale of each."""
        if self.fisher_type == "empirical":
            if y is None:
                raise ValueError("fisher_type='empirical' needs labels")
            return self.loss.output_gradient(f, y)[None], 1.0
        if self.fisher_type == "type2":
            return self.loss.hessian_sqrt(f), 1.0
        return self.loss.sampled_gradients(f, self.mc_samples, self.generator), 1.0 / self.mc_samples

    @staticmethod
    @torch.no_grad()
    def _eval_outputs(x: Tensor, outputs_fn: Callable[[Tensor], Tensor]) -> Tensor:
        return outputs_fn(x).detach()

    def accumulate(
        self, x: Tensor, y: Tensor | None = None, outputs_fn: Callable[[Tensor], Tensor] | None = None
    ) -> int:
        """Add one batch's statistics; return its number of samples.

        The backward vectors are propagated through ``network``; the loss Hessian (CE) or residual (empirical)
        is evaluated at ``outputs_fn(x)`` when given (LQF: the linearized outputs), else at ``network(x)``.
        """
        # outputs_fn may run the same modules (LQF's jvp through the w0 network): call it before hooking them
        f_eval = None if outputs_fn is None else self._eval_outputs(x, outputs_fn)
        self._calls, self._anchors = {}, []
        handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in self.modules.items()]
        try:
            with torch.enable_grad():
                f = self.network(x)
                if f.ndim != 2:
                    raise ValueError(f"K-FAC expects outputs of shape (N, C), got {tuple(f.shape)}")
                f_eval = f.detach() if f_eval is None else f_eval.to(f.dtype)
                if f_eval.shape != f.shape:
                    raise ValueError(f"outputs_fn gave shape {tuple(f_eval.shape)}, network {tuple(f.shape)}")
                vectors, self._g_scale = self._backward_vectors(f_eval, y)
                for k in range(vectors.shape[0]):
                    torch.autograd.grad(f, self._anchors, grad_outputs=vectors[k],
                                        retain_graph=k < vectors.shape[0] - 1, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            self._anchors = []
            self._end_batch()
        self.count += x.shape[0]
        return x.shape[0]

    def _end_batch(self) -> None:
        """Release per-batch state (nothing here; EKFAC drops its cached inputs)."""

    def all_reduce(self) -> None:
        """Sum the statistics and the sample count over processes (no-op unless torch.distributed is up)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        stores = self._stores()
        # a rank that accumulated nothing still needs the collective's device (NCCL: the network's)
        fallback = next(self.network.parameters(), torch.empty(0)).device
        device = next((t.device for store, _ in stores for t in store.values()), fallback)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=device)
        dist.all_reduce(count)
        self.count = int(count.item())
        for store, shape in stores:
            for name in sorted(self.modules):
                if name not in store:  # a layer unreached on this rank still joins the collective
                    store[name] = torch.zeros(shape(name), dtype=torch.float64, device=device)
                dist.all_reduce(store[name])

    def _factor_dim(self, name: str, is_A: bool) -> int:
        m = self.modules[name]
        if not is_A:
            return m.out_features if isinstance(m, nn.Linear) else m.out_channels
        d = m.in_features if isinstance(m, nn.Linear) else m.in_channels * math.prod(m.kernel_size)
        return d + int(self.with_bias[name])


class FactorAccumulator(LayerHookPass):
    """Accumulates K-FAC factor sums over batches; ``finalize`` normalizes by the (global) sample count.

    See :class:`LayerHookPass` for ``layers``, ``loss``, ``fisher_type``; ``kfac_approx`` chooses how weight
    sharing enters the factors (module docstring).
    """

    def __init__(
        self,
        network: nn.Module,
        layers: Mapping[str, bool],
        loss: ClassificationLoss,
        fisher_type: str = "type2",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(network, layers, loss, fisher_type=fisher_type, mc_samples=mc_samples, generator=generator)
        _check_choice("kfac_approx", kfac_approx, KFAC_APPROXES)
        self.kfac_approx = kfac_approx
        self.A_sum: dict[str, Tensor] = {}
        self.G_sum: dict[str, Tensor] = {}

    def _stores(self) -> list[tuple[dict[str, Tensor], Callable[[str], tuple[int, ...]]]]:
        return [(self.A_sum, lambda n: (self._factor_dim(n, True),) * 2),
                (self.G_sum, lambda n: (self._factor_dim(n, False),) * 2)]

    # -- per-layer statistics ---------------------------------------------------------------------------------
    def _input_rows(self, name: str, module: nn.Module, x: Tensor) -> tuple[Tensor, float]:
        """Rows whose outer products sum to the per-batch ``A`` contribution, and the weight of each row."""
        rows = input_rows(module, x, self.with_bias[name])
        if self.kfac_approx == "reduce":
            return rows.mean(dim=1), 1.0
        # expand: each sample contributes the mean over its shared positions
        return rows.reshape(-1, rows.shape[-1]), 1.0 / rows.shape[1]

    def _on_input(self, name: str, module: nn.Module, x: Tensor) -> None:
        per_sample = x[:1].numel() * (math.prod(module.kernel_size) if isinstance(module, nn.Conv2d) else 1)
        chunks = sample_chunks(x, per_sample) if isinstance(module, nn.Conv2d) else (x,)
        for chunk in chunks:
            rows, weight = self._input_rows(name, module, chunk)
            cov = (rows.T @ rows).to(torch.float64).mul_(weight)
            self._add(self.A_sum, name, cov)

    def _on_output_grad(self, name: str, module: nn.Module, g: Tensor) -> None:
        g = output_rows(module, g)
        g = g.sum(dim=1) if self.kfac_approx == "reduce" else g.reshape(-1, g.shape[-1])
        self._add(self.G_sum, name, (g.T @ g).to(torch.float64).mul_(self._g_scale))

    # -- results ----------------------------------------------------------------------------------------------
    def finalize(self, reduction: str = "mean", dtype: torch.dtype | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer: (A, G)}`` normalized as in the module docstring; cast to ``dtype`` when given."""
        _check_choice("reduction", reduction, REDUCTIONS)
        if self.count == 0:
            raise RuntimeError("no sample was accumulated: K-FAC factors are undefined")
        out = {}
        for name in self.modules:
            A = self.A_sum[name] / self.count
            G = self.G_sum[name] / (self.count if reduction == "mean" else 1.0)
            out[name] = (A.to(dtype), G.to(dtype)) if dtype is not None else (A, G)
        return out
