"""The linearized network of LQF: ``f_lin(x) = f(x; w0) + J(x; w0)·δ`` with trainable ``δ``.

One forward pass carries the primal activations (at w0) together with the tangent along δ, using PyTorch
forward-mode AD over :func:`torch.func.functional_call`; the backward pass then differentiates the tangent
with respect to δ (reverse-over-forward). ``benchmarks/README.md`` gives the cost against fine-tuning.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from lqf_exp.per_sample_jacobian import hook_jacobian, hook_jacobian_supported
from lqf_exp.prefix_cache import PrefixFeatureCache
from lqf_exp.tangent import FusedTangent

log = logging.getLogger(__name__)

__all__ = ["TANGENT_PATHS", "LinearizedNetwork", "zero_gradient_fraction"]

_BN_AFFINE = ("freeze", "linearize")
# auto: fused where every module has a rule and the first batch agrees with forward-mode AD, else autodiff;
# fused: primal and tangent stacked through per-module rules (lqf_exp.tangent); autodiff: forward-mode AD duals.
TANGENT_PATHS = ("auto", "fused", "autodiff")
# max |fused − autodiff| / max |autodiff| allowed on the first batch, by output dtype
_CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _delta_key(name: str) -> str:
    # ParameterDict keys cannot contain dots.
    return name.replace(".", "__")


class LinearizedNetwork(nn.Module):
    """First-order Taylor expansion of ``net`` around its weights ``w0``, trained through ``δ = w − w0``.

    Args:
        net: the network at w0 (e.g. pretrained backbone plus a probe-initialized ``fc`` head). The wrapper
            takes ownership: its parameters are frozen in place (``requires_grad=False``, kept as
            ``nn.Parameter`` so DDP does not re-broadcast them each step) and it stays in eval mode for good.
        linearize: which parameters get a δ. ``"all"`` (default): every parameter. ``"head"``: only the head
            module (the paper's "LQF FC"). The name of a top-level child (``"layer3"``, ``"layer4"``...): that
            child and every later child in forward order; earlier children form a frozen feature extractor
            that carries no tangent and records no autograd graph (nothing there requires grad).
        bn_affine: ``"freeze"`` (default): BatchNorm γ/β stay at w0 and get no δ, so every δ belongs to a
            ``Conv2d``/``Linear`` layer, exactly the layers K-FAC preconditions (γ/β are few and the GaF
            forward pass LQF builds on folds BN into the convs anyway). ``"linearize"``: γ/β get δs too.
        head_name: attribute name of the final linear layer.
        tangent: ``"fused"`` (``lqf_exp.tangent``: primal and tangent stacked on the batch axis through
            per-module rules, one convolution call for both streams, the same numbers as forward-mode AD to
            round-off), ``"autodiff"`` (PyTorch forward-mode AD, any differentiable module) or ``"auto"``
            (default: fused when every module of the linearized blocks has a rule, else autodiff). The first fused
            call is checked against forward-mode AD along a random direction, so a non-linearity the rules cannot
            see (a functional ``F.gelu`` in some ``forward``) raises (``fused``) or switches to autodiff with a
            warning (``auto``) instead of giving a wrong tangent.
        prefix_cache_gb: with ``linearize`` a block or ``"head"``, keep the frozen prefix's features of every input
            seen, up to this many GB (:mod:`lqf_exp.prefix_cache`), so a later pass over the same images runs only
            the linearized blocks; ``None`` (default): recompute them every time.

    BatchNorm always runs in eval mode with frozen running statistics (``train()`` is overridden), so
    ``f_lin`` is a fixed per-sample function that is exactly linear in δ. Only the δs (``self.deltas``) require
    grad; dtype and device follow the module (``.double()``, ``.to(device)``).
    """

    def __init__(
        self, net: nn.Module, linearize: str = "all", bn_affine: str = "freeze", head_name: str = "fc",
        tangent: str = "auto", prefix_cache_gb: float | None = None,
    ) -> None:
        super().__init__()
        if bn_affine not in _BN_AFFINE:
            raise ValueError(f"bn_affine must be one of {_BN_AFFINE}, got {bn_affine!r}")
        if tangent not in TANGENT_PATHS:
            raise ValueError(f"tangent must be one of {TANGENT_PATHS}, got {tangent!r}")
        self.tangent = tangent
        self._fused_checked = False
        self.linearize = linearize
        self.bn_affine = bn_affine
        self.head_name = head_name
        self.net = net.eval()
        for p in net.parameters():
            p.requires_grad_(False)

        children = [n for n, _ in net.named_children()]
        start = head_name if linearize == "head" else linearize
        if linearize == "all":
            self.linearized_blocks: list[str] = children
        elif start in children:
            self.linearized_blocks = children[children.index(start) :]
        else:
            raise ValueError(
                f"Unknown linearize={linearize!r}; valid: 'all', 'head', or a top-level child of the "
                f"network: {children}"
            )
        frozen_bn = set()
        if bn_affine == "freeze":
            frozen_bn = {n for n, m in net.named_modules() if isinstance(m, _BatchNorm)}
        names = []
        for name, _ in net.named_parameters():
            module_name, _, _ = name.rpartition(".")
            if name.split(".")[0] in self.linearized_blocks and module_name not in frozen_bn:
                names.append(name)
        if not names:
            raise ValueError(f"linearize={linearize!r} selects no parameter to train")
        self._fused = FusedTangent(net, self.linearized_blocks) if tangent != "autodiff" else None
        unsupported = self._fused.unsupported() if self._fused is not None else []
        if unsupported and tangent == "auto":
            log.info("tangent=auto: forward-mode AD, since %s have no fused tangent rule", unsupported)
            self._fused = None
        prefix = [m for n, m in net.named_children() if n not in self.linearized_blocks]
        self.prefix_cache = PrefixFeatureCache(prefix_cache_gb) if prefix and prefix_cache_gb is not None else None
        self._prefix_children = prefix
        self._names: list[str] = names
        self._check_head()
        params = dict(net.named_parameters())
        # An OrderedDict keeps forward order (a plain dict would be sorted by key).
        self.deltas = nn.ParameterDict(
            OrderedDict((_delta_key(n), nn.Parameter(torch.zeros_like(params[n]))) for n in names)
        )
        self._order_checked = False

    def _check_head(self) -> None:
        head = getattr(self.net, self.head_name, None)
        if self.linearize == "head" and not isinstance(head, nn.Module):
            raise ValueError(f"linearize='head' needs a head module net.{self.head_name}")
        weight = getattr(head, "weight", None)
        backbone = any(not n.startswith(self.head_name + ".") for n in self._names)
        if backbone and isinstance(weight, Tensor) and not bool(weight.detach().any()):
            raise ValueError(
                f"The base head net.{self.head_name}.weight is all zeros. Every backbone direction of the "
                "Jacobian passes through the head, so a zero head makes J zero for all backbone weights and "
                "only the head would learn (LQF would collapse to a linear probe). Initialize the head with "
                "lqf_exp.head_init.init_head (probe or random) before linearizing."
            )

    # ---- mode handling -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> LinearizedNetwork:
        """Set ``self.training`` but keep the wrapped network in eval mode (frozen BN statistics)."""
        super().train(mode)
        self.net.eval()
        return self

    # ---- δ access ----------------------------------------------------------------------------------------
    @property
    def linearized_names(self) -> list[str]:
        """Names (in ``net.named_parameters()``) of the parameters that have a δ."""
        return list(self._names)

    def delta_named(self) -> dict[str, nn.Parameter]:
        """Map original parameter name (e.g. ``layer1.0.conv1.weight``) to its δ."""
        return {n: self.deltas[_delta_key(n)] for n in self._names}

    def delta_list(self) -> list[nn.Parameter]:
        """The δs in the order of :attr:`linearized_names` (the order of every vector a solver handles)."""
        return [self.deltas[_delta_key(n)] for n in self._names]

    def curvature_layers(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Map each ``Linear``/``Conv2d`` module of ``base_network`` with a weight δ to ``(δ_weight, δ_bias)``.

        This is the ``layers`` field of :class:`lqf_exp.curvature.CurvatureTargets` for LQF.
        """
        deltas = self.delta_named()
        out: dict[str, tuple[Tensor, Tensor | None]] = {}
        for name, module in self.net.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and f"{name}.weight" in deltas:
                out[name] = (deltas[f"{name}.weight"], deltas.get(f"{name}.bias"))
        return out

    @property
    def base_network(self) -> nn.Module:
        """The wrapped network at w0 (eval mode, frozen); its GGN is the LQF curvature."""
        return self.net

    def apply_to_base(self, x: Tensor) -> Tensor:
        """``f(x; w0)``."""
        return self.net(x)

    # ---- forward -----------------------------------------------------------------------------------------
    def forward_with_primal(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(f(x; w0), J(x; w0)·δ)``; the first is detached, the second is differentiable in δ."""
        return self.jvp(x, self.delta_list())

    def jvp(self, x: Tensor, tangents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Return ``(f(x; w0), J(x; w0)·v)`` for the tangents ``v`` (shaped like :meth:`delta_list`).

        With ``v = δ`` this is the linearized forward; with any other ``v`` it is the curvature-vector product's
        forward half (``J v``), differentiable in ``v`` when ``v`` requires grad (``Jᵀu`` by autograd).
        """
        if torch.is_inference_mode_enabled():
            # Forward-mode AD silently drops tangents under inference mode: f_lin would quietly become f(x; w0).
            raise RuntimeError(
                "LinearizedNetwork cannot run under torch.inference_mode(); use torch.no_grad() "
                "(Lightning: Trainer(inference_mode=False), as conf/trainer/default.yaml sets)"
            )
        if not self._order_checked:
            self._check_forward_order(x)
        if self._fused is not None and not self._fused_checked:
            self._check_fused(x)
        with self._prefix_features(x):
            if self._fused is None:
                primal, tangent = self._autodiff_jvp(x, tangents)
            else:
                primal, tangent = self._fused(x, dict(zip(self._names, tangents, strict=True)))
        return primal.detach(), tangent

    @contextmanager
    def _prefix_features(self, x: Tensor) -> Iterator[None]:
        """Serve the frozen prefix's features from the cache, or record them for the next time."""
        cache = self.prefix_cache
        if cache is None:
            yield
            return
        first = self.net.get_submodule(self.linearized_blocks[0])
        keys = cache.keys(x)
        features = cache.lookup(x, keys)
        if features is not None:
            with cache.serving(self._prefix_children, first, features):
                yield
            return
        sink: list[Tensor] = []
        with cache.capturing(first, sink):
            yield
        if sink:
            cache.store(keys, sink[0])

    def _autodiff_jvp(self, x: Tensor, tangents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        if torch.is_autocast_enabled(x.device.type):
            # torch 2.x: eval batch_norm under autocast returns a low-precision primal with a float32 tangent, and
            # the next convolution then fails on the mixed dual.
            raise RuntimeError(
                "tangent='autodiff' does not run under autocast (trainer.precision=bf16-mixed/16-mixed): PyTorch's "
                "forward-mode AD mixes dtypes at eval BatchNorm. Use method.tangent=fused (the default), which "
                "supports mixed precision, or trainer.precision=32-true."
            )
        params = dict(self.net.named_parameters())
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(params[n], t) for n, t in zip(self._names, tangents, strict=True)}
            out = functional_call(self.net, duals, (x,), strict=False)
            primal, tangent = fwAD.unpack_dual(out)
        if tangent is None:  # output does not depend on any linearized parameter
            tangent = torch.zeros_like(primal)
        return primal, tangent

    @torch.no_grad()
    def _check_fused(self, x: Tensor) -> None:
        """Compare the fused tangent with forward-mode AD once, along a random direction (δ is often zero)."""
        assert self._fused is not None
        generator = torch.Generator(device=x.device).manual_seed(0)
        direction = [torch.randn(d.shape, generator=generator, device=d.device, dtype=d.dtype) * 1e-2
                     for d in self.delta_list()]
        # in the parameters' precision: the check is about the rules, not about rounding under autocast
        with torch.autocast(x.device.type, enabled=False):
            fused = self._fused(x, dict(zip(self._names, direction, strict=True)))
            reference = self._autodiff_jvp(x, direction)
        for what, got, want in zip(("f(x; w0)", "J(x; w0)·v"), fused, reference, strict=True):
            scale = float(want.abs().max()) or 1.0
            error = float((got - want).abs().max()) / scale
            tolerance = _CHECK_TOLERANCE.get(want.dtype, 1e-4)
            if not error <= tolerance:
                message = (
                    f"tangent='fused' gives {what} {error:.2e} (relative) away from forward-mode AD (tolerance "
                    f"{tolerance:.0e}): the network computes something the fused rules do not see (e.g. a "
                    "functional non-linearity inside a forward)."
                )
                if self.tangent == "fused":
                    raise RuntimeError(message + " Use method.tangent=autodiff or auto.")
                log.warning("%s tangent=auto: forward-mode AD from now on.", message)
                self._fused = None
                break
        self._fused_checked = True

    def forward(self, x: Tensor) -> Tensor:
        """``f_lin(x) = f(x; w0) + J(x; w0)·δ``."""
        primal, tangent = self.forward_with_primal(x)
        return primal + tangent

    def jacobian(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """The per-sample Jacobian ``J(x; w0)`` with respect to the δs, ``[B, C, P]`` (P = all δ entries, in the
        order of :meth:`delta_list`): by layer hooks (one backward pass per class,
        :mod:`lqf_exp.per_sample_jacobian`) where every δ belongs to a Linear/Conv2d layer, else by reverse mode
        vectorized over the batch (``torch.func``). ``out``: a ``[B, C, P]`` tensor to write the rows into."""
        if hook_jacobian_supported(self.net, self._names):
            start = None if self.linearize == "all" else self.net.get_submodule(self.linearized_blocks[0])
            with torch.autocast(x.device.type, enabled=False):
                return hook_jacobian(self.net, self._names, x, start=start, out=out)
        params = dict(self.net.named_parameters())
        point = {n: params[n].detach() for n in self._names}

        def single(p: dict[str, Tensor], xi: Tensor) -> Tensor:
            return functional_call(self.net, p, (xi[None],), strict=False)[0]

        rows = vmap(jacrev(single), in_dims=(None, 0))(point, x)
        jacobian = torch.cat([rows[n].reshape(x.shape[0], -1, point[n].numel()) for n in self._names], dim=2)
        return jacobian if out is None else out.copy_(jacobian)

    @torch.no_grad()
    def _check_forward_order(self, x: Tensor) -> None:
        """Once, on a forward at w0: no frozen-prefix child with parameters may run after a linearized child.

        ``named_children`` order is registration order, not necessarily call order; if the prefix were not a
        prefix, frozen parameters would sit inside the linearized part, which is not what ``linearize`` means.
        """
        calls: list[str] = []
        handles = [m.register_forward_pre_hook(lambda _m, _i, n=n: calls.append(n))
                   for n, m in self.net.named_children() if any(True for _ in m.parameters())]
        try:
            with torch.autocast(x.device.type, enabled=False):
                self.net(x)
        finally:
            for h in handles:
                h.remove()
        first = next((i for i, n in enumerate(calls) if n in self.linearized_blocks), len(calls))
        late = [n for n in calls[first:] if n not in self.linearized_blocks]
        if late:
            raise RuntimeError(
                f"linearize={self.linearize!r}: frozen children {late} run after the first linearized child "
                f"{calls[first]!r} (call order {calls}); choose an earlier block or 'all'"
            )
        self._order_checked = True


def zero_gradient_fraction(
    linearized_net: LinearizedNetwork, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> float:
    """Fraction of backbone δ entries (all δs except the head's) whose gradient of ``loss_fn(f_lin(x), y)`` is
    exactly zero: e.g. filters behind dead ReLUs, which the linearized model can never train."""
    head = linearized_net.head_name + "."
    named = {n: d for n, d in linearized_net.delta_named().items() if not n.startswith(head)}
    if not named:
        raise ValueError("the linearized network has no backbone δ")
    loss = loss_fn(linearized_net(x), y)
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    pairs = zip(named.values(), grads, strict=True)
    zeros = sum(int(d.numel()) if g is None else int((g == 0).sum()) for d, g in pairs)
    return zeros / sum(d.numel() for d in named.values())
