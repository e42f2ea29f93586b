"""The linearized network of LQF: ``f_lin(x) = f(x; w0) + J(x; w0)·δ`` with trainable ``δ``.

Built once at construction, from three explicit parts that share the base network's modules (no second copy of w0):

- ``prefix``: the frozen children before the first linearized block (``method.linearize=<block>``/``head``), run as
  they are; its output is the input of the rest, so its features can be computed once per dataset
  (:mod:`lqf_exp.prefix_cache`) and fed to :meth:`LinearizedNetwork.on_prefix_features`.
- the linearized blocks, either as a *dual* module tree (``tangent=fused``, :mod:`lqf_exp.tangent`: primal and
  tangent stacked on the batch axis through per-module rules) or through PyTorch forward-mode AD over
  :func:`torch.func.functional_call` (``tangent=autodiff``: any differentiable module).
- ``deltas``: the trainable δ, one per linearized parameter (:mod:`lqf_exp.delta_selection`).

``J·v`` for any ``v`` is the same forward with ``v`` in place of δ (``functional_call`` on ``deltas.*``), so it is
differentiable in ``v`` (``Jᵀu`` by autograd). Nothing is patched at run time, so ``torch.compile`` traces it whole.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from lqf_exp.delta_selection import DeltaSelection, delta_key, select_deltas
from lqf_exp.options import TANGENT_PATHS
from lqf_exp.per_sample_jacobian import hook_jacobian, hook_jacobian_supported
from lqf_exp.tangent import UnsupportedModuleError, build_dual, copy_container
from lqf_exp.tangent_check import check_prefix_split, tangent_mismatch

log = logging.getLogger(__name__)

__all__ = ["TANGENT_PATHS", "LinearizedNetwork", "zero_gradient_fraction"]


def _suffix(net: nn.Module, prefix: Sequence[str]) -> nn.Module:
    """``net`` with its prefix children replaced by ``nn.Identity``: maps the prefix's output to ``f(x; w0)``, sharing
    every other module (and parameter name) with ``net``."""
    return copy_container(net, {n: nn.Identity() if n in prefix else m for n, m in net.named_children()})


class LinearizedNetwork(nn.Module):
    """First-order Taylor expansion of ``net`` around its weights ``w0``, trained through ``δ = w − w0``.

    Args:
        net: the network at w0 (e.g. pretrained backbone plus a probe-initialized ``fc`` head). The wrapper takes
            ownership: its parameters are frozen in place (``requires_grad=False``, kept as ``nn.Parameter`` so
            DDP does not re-broadcast them each step) and it stays in eval mode for good (frozen BN statistics, so
            ``f_lin`` is a fixed per-sample function, exactly linear in δ).
        linearize, bn_affine, head_name: which parameters get a δ (:func:`lqf_exp.delta_selection.select_deltas`).
        tangent: ``"fused"`` (the dual module tree; the same numbers as forward-mode AD to round-off, and mixed
            precision), ``"autodiff"`` (forward-mode AD, any differentiable module) or ``"auto"`` (default: fused
            when every module of the linearized blocks has a rule, else autodiff). The first call compares the
            fused path with forward-mode AD along a random direction, so a non-linearity the rules cannot see (a
            functional ``F.gelu`` inside a ``forward``) raises (``fused``) or switches to autodiff (``auto``).
    """

    def __init__(self, net: nn.Module, linearize: str = "all", bn_affine: str = "freeze", head_name: str = "fc",
                 tangent: str = "auto") -> None:
        super().__init__()
        if tangent not in TANGENT_PATHS:
            raise ValueError(f"tangent must be one of {TANGENT_PATHS}, got {tangent!r}")
        selection = select_deltas(net, linearize, bn_affine, head_name)
        self.linearize, self.bn_affine, self.head_name, self.tangent = linearize, bn_affine, head_name, tangent
        self.net = net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self._names = list(selection.names)
        params = dict(net.named_parameters())
        self.deltas = nn.ParameterDict(  # an OrderedDict keeps forward order (a plain dict is sorted by key)
            OrderedDict((delta_key(n), nn.Parameter(torch.zeros_like(params[n]))) for n in self._names))
        self.dual = self._build_dual(selection) if tangent != "autodiff" else None
        # Not registered (the modules are net's; a registered copy would repeat their state-dict keys).
        self.__dict__["prefix"] = nn.Sequential(*(net.get_submodule(n) for n in selection.prefix))
        self.__dict__["suffix"] = _suffix(net, selection.prefix)
        self.__dict__["first_block"] = net.get_submodule(selection.blocks[0])
        self._first_block_name = selection.blocks[0]
        self.linearized_blocks = list(selection.blocks)
        self.from_features = False
        self._checked = False

    def _build_dual(self, selection: DeltaSelection) -> nn.Module | None:
        try:
            return build_dual(self.net, list(selection.blocks), self.deltas, {n: delta_key(n) for n in self._names})
        except UnsupportedModuleError as error:
            if self.tangent == "fused":
                raise
            log.info("tangent=auto: forward-mode AD, since %s", error)
            return None

    def train(self, mode: bool = True) -> LinearizedNetwork:
        """Set ``self.training`` but keep the wrapped network in eval mode (frozen BN statistics)."""
        super().train(mode)
        self.net.eval()
        return self

    def on_prefix_features(self) -> LinearizedNetwork:
        """The same linearized network (the same δ, modules and tangent path) taking the frozen prefix's *output*
        instead of images: for inputs whose prefix features were computed once (:mod:`lqf_exp.prefix_cache`)."""
        view = copy.copy(self)  # shares _modules, so δ, net and the dual tree are the same objects
        view.__dict__["prefix"] = nn.Sequential()
        view.__dict__["_compiled_call_impl"] = None  # a compiled self would run self's forward, prefix included
        view.from_features = True
        return view

    # ---- δ --------------------------------------------------------------------------------------------------
    @property
    def linearized_names(self) -> list[str]:
        """Names (in ``net.named_parameters()``) of the parameters that have a δ."""
        return list(self._names)

    def delta_named(self) -> dict[str, nn.Parameter]:
        """Map original parameter name (e.g. ``layer1.0.conv1.weight``) to its δ."""
        return {n: self.deltas[delta_key(n)] for n in self._names}

    def delta_list(self) -> list[nn.Parameter]:
        """The δs in the order of :attr:`linearized_names` (the order of every vector a solver handles)."""
        return [self.deltas[delta_key(n)] for n in self._names]

    @property
    def base_network(self) -> nn.Module:
        """The wrapped network at w0 (eval mode, frozen); its GGN is the LQF curvature."""
        return self.net

    def apply_to_base(self, x: Tensor) -> Tensor:
        """``f(x; w0)`` (``x``: images, or prefix features for :meth:`on_prefix_features`)."""
        return self.suffix(self.prefix(x))

    def curvature_layers(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Map each ``Linear``/``Conv2d`` module of ``base_network`` with a weight δ to ``(δ_weight, δ_bias)``
        (the ``layers`` field of :class:`lqf_exp.curvature.CurvatureTargets` for LQF)."""
        deltas = self.delta_named()
        return {name: (deltas[f"{name}.weight"], deltas.get(f"{name}.bias"))
                for name, module in self.net.named_modules()
                if isinstance(module, (nn.Linear, nn.Conv2d)) and f"{name}.weight" in deltas}

    # ---- forward, jvp, jacobian -----------------------------------------------------------------------------
    def forward(self, x: Tensor, *, split: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``f_lin(x) = f(x; w0) + J(x; w0)·δ``; ``split=True``: the pair ``(f(x; w0), J(x; w0)·δ)``, the first
        detached, the second differentiable in δ."""
        compiling = torch.compiler.is_compiling()
        if not compiling and torch.is_inference_mode_enabled():
            # Forward-mode AD silently drops tangents under inference mode: f_lin would quietly become f(x; w0).
            raise RuntimeError("LinearizedNetwork cannot run under torch.inference_mode(); use torch.no_grad() "
                               "(Lightning: Trainer(inference_mode=False), as conf/trainer/default.yaml sets)")
        if not self._checked and not compiling:
            self._check(x)
        features = self.prefix(x)
        if self.dual is None:
            primal, tangent = self._autodiff(features, self.delta_list())
        else:
            stacked = self.dual(features)
            primal, tangent = stacked.view(2, -1, *stacked.shape[1:]).unbind(0)
        primal = primal.detach()
        return (primal, tangent) if split else primal + tangent

    def jvp(self, x: Tensor, tangents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``(f(x; w0), J(x; w0)·v)`` for tangents ``v`` shaped like :meth:`delta_list`, differentiable in ``v``:
        the forward with ``v`` in place of δ."""
        deltas = self.delta_list()
        if len(tangents) == len(deltas) and all(t is d for t, d in zip(tangents, deltas, strict=True)):
            return self(x, split=True)
        values = {f"deltas.{delta_key(n)}": t for n, t in zip(self._names, tangents, strict=True)}
        return functional_call(self, values, (x,), {"split": True}, strict=False)

    def _autodiff(self, features: Tensor, tangents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        if torch.is_autocast_enabled(features.device.type):
            # torch 2.x: eval batch_norm under autocast returns a low-precision primal with a float32 tangent, and
            # the next convolution then fails on the mixed dual.
            raise RuntimeError(
                "tangent='autodiff' does not run under autocast (trainer.precision=bf16-mixed/16-mixed): PyTorch's "
                "forward-mode AD mixes dtypes at eval BatchNorm. Use method.tangent=fused (the default), which "
                "supports mixed precision, or trainer.precision=32-true.")
        params = dict(self.suffix.named_parameters())
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(params[n], t) for n, t in zip(self._names, tangents, strict=True)}
            primal, tangent = fwAD.unpack_dual(functional_call(self.suffix, duals, (features,), strict=False))
        return primal, torch.zeros_like(primal) if tangent is None else tangent

    def _check(self, x: Tensor) -> None:
        """Once (:mod:`lqf_exp.tangent_check`): the prefix/suffix split computes ``net(x)``, and the fused tangent
        agrees with forward-mode AD."""
        self._checked = True
        if len(self.prefix) and not self.from_features:
            check_prefix_split(self.net, self.prefix, self.suffix, self._first_block_name, x)
        if self.dual is None:
            return

        def fused(v: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
            return self.jvp(x, v)

        def autodiff(v: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
            return self._autodiff(self.prefix(x), v)

        mismatch = tangent_mismatch(fused, autodiff, self.delta_list(), x.device)
        if mismatch is None:
            return
        if x.dtype != torch.float64 and self._tangent_mismatch_in_float64(x) is None:
            log.info("tangent='fused' differs from forward-mode AD in %s but not in float64: rounding at an "
                     "activation kink; the fused path stays", x.dtype)
            return
        if self.tangent == "fused":
            raise RuntimeError(mismatch + " Use method.tangent=autodiff or auto.")
        log.warning("%s tangent=auto: forward-mode AD from now on.", mismatch)
        self.dual = None

    def _tangent_mismatch_in_float64(self, x: Tensor) -> str | None:
        """The fused-vs-AD comparison again on a float64 copy of this network (a few samples of ``x``)."""
        twin = copy.deepcopy(self).double()
        twin._checked = True
        sample = x[:8].double()
        return tangent_mismatch(lambda v: twin.jvp(sample, v), lambda v: twin._autodiff(twin.prefix(sample), v),
                                twin.delta_list(), x.device)

    def jacobian(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """The per-sample Jacobian ``J(x; w0)`` with respect to the δs, ``[B, C, P]`` (P = all δ entries, in the
        order of :meth:`delta_list`): by layer hooks (one backward pass per class,
        :mod:`lqf_exp.per_sample_jacobian`) where every δ belongs to a Linear/Conv2d layer, else by reverse mode
        vectorized over the batch (``torch.func``). ``out``: a ``[B, C, P]`` tensor to write the rows into."""
        with torch.no_grad():
            features = self.prefix(x)
        if hook_jacobian_supported(self.suffix, self._names):
            start = None if self.linearize == "all" else self.first_block
            with torch.autocast(x.device.type, enabled=False):
                return hook_jacobian(self.suffix, self._names, features, start=start, out=out)
        params = dict(self.suffix.named_parameters())
        point = {n: params[n].detach() for n in self._names}

        def single(p: dict[str, Tensor], xi: Tensor) -> Tensor:
            return functional_call(self.suffix, p, (xi[None],), strict=False)[0]

        rows = vmap(jacrev(single), in_dims=(None, 0))(point, features)
        jacobian = torch.cat([rows[n].reshape(x.shape[0], -1, point[n].numel()) for n in self._names], dim=2)
        return jacobian if out is None else out.copy_(jacobian)


def zero_gradient_fraction(linearized_net: LinearizedNetwork, x: Tensor, y: Tensor,
                           loss_fn: torch.nn.Module) -> float:
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
