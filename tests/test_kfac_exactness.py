"""K-FAC exactness (float64) against dense GGN / empirical-Fisher blocks built independently with torch.func.

Cases from "KFAC from scratch" (Dangel et al.): one datum through an MLP (type-2 == GGN, MC -> GGN, empirical ==
EF), a deep linear network with N > 1 (type-2 == GGN, MC -> GGN, empirical != EF), plus the LQF identity
Hessian(LQF objective) == GGN(network at w0) and the mean-vs-sum scaling of the factors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, jvp

from lqf_exp.precond import FactorAccumulator

from .helpers.losses import make_loss

DT = torch.float64
ALPHA = 1.5  # MSE target scale, to check it enters the empirical factor


def per_sample_loss(f: Tensor, y: Tensor, loss: str) -> Tensor:
    """``(N,)`` per-sample losses in the project's convention (MSE: Σ_c (f_c − α onehot_c)², no ½)."""
    if loss == "mse":
        onehot = (torch.arange(f.shape[1]) == y[:, None]).to(f.dtype)  # F.one_hot is not vmap-able
        return (f - ALPHA * onehot).pow(2).sum(dim=1)
    return F.cross_entropy(f, y, reduction="none")


def layer_jacobian(net: nn.Module, name: str, x: Tensor) -> Tensor:
    """``(N·C, out·(in+1))`` Jacobian of the outputs w.r.t. W̃ = (W b) of layer ``name`` (row-major)."""
    params = dict(net.named_parameters())
    keys = [f"{name}.weight", f"{name}.bias"]

    def f(w: Tensor, b: Tensor) -> Tensor:
        return functional_call(net, {**params, keys[0]: w, keys[1]: b}, (x,))

    Jw, Jb = jacrev(f, argnums=(0, 1))(params[keys[0]], params[keys[1]])
    N, C = Jw.shape[:2]
    J = torch.cat([Jw.reshape(N, C, Jw.shape[2], -1), Jb.unsqueeze(-1)], dim=-1)
    return J.reshape(N * C, -1)


def dense_ggn_block(net: nn.Module, name: str, x: Tensor, y: Tensor, loss: str, reduction: str = "mean",
                    outputs: Tensor | None = None) -> Tensor:
    """Jᵀ H J with H the Hessian of the total loss w.r.t. all outputs (evaluated at ``outputs`` if given)."""
    f0 = net(x).detach() if outputs is None else outputs.detach()
    red = torch.mean if reduction == "mean" else torch.sum
    H = hessian(lambda f: red(per_sample_loss(f, y, loss)))(f0).reshape(f0.numel(), f0.numel())
    J = layer_jacobian(net, name, x)
    return J.T @ H @ J


def dense_ef_block(net: nn.Module, name: str, x: Tensor, y: Tensor, loss: str) -> Tensor:
    """(1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ for the W̃ block (per-sample gradients from the Jacobian and output gradients)."""
    f0 = net(x).detach()
    g_out = torch.func.vmap(torch.func.grad(lambda f, t: per_sample_loss(f[None], t[None], loss).sum()))(f0, y)
    J = layer_jacobian(net, name, x).reshape(x.shape[0], f0.shape[1], -1)
    g = torch.einsum("nc,ncp->np", g_out, J)
    return g.T @ g / x.shape[0]


def kfac_blocks(net: nn.Module, x: Tensor, y: Tensor, loss: str, fisher: str, mc: int = 1, reduction: str = "mean",
                repeats: int = 1, **kw) -> dict[str, Tensor]:
    layers = {n: True for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    acc = FactorAccumulator(net, layers, make_loss(loss, ALPHA), fisher_type=fisher, mc_samples=mc,
                            generator=torch.Generator().manual_seed(0))
    acc.accumulate(x.repeat(repeats, 1), y.repeat(repeats), **kw)
    return {n: torch.kron(G, A) for n, (A, G) in acc.finalize(reduction).items()}


def mlp(act: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), act(), nn.Linear(4, 4), act(), nn.Linear(4, 2)).to(DT)


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


ACTS = [nn.Tanh, nn.Sigmoid, nn.LeakyReLU]


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.__name__)
def test_one_datum_type2_and_empirical_exact(act: type[nn.Module], loss: str) -> None:
    net = mlp(act)
    x, y = torch.randn(1, 5, dtype=DT), torch.tensor([1])
    type2, emp = kfac_blocks(net, x, y, loss, "type2"), kfac_blocks(net, x, y, loss, "empirical")
    for name in type2:
        ggn, ef = dense_ggn_block(net, name, x, y, loss), dense_ef_block(net, name, x, y, loss)
        torch.testing.assert_close(type2[name], ggn, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(emp[name], ef, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_one_datum_mc_converges(loss: str) -> None:
    net = mlp(nn.Tanh)
    x, y = torch.randn(1, 5, dtype=DT), torch.tensor([0])
    # 10000 copies of the datum × 20 samples each = 2·10⁵ MC samples of the same per-sample Fisher (at 2·10⁴
    # the off-diagonal MC noise, ~1/√M of the max, still exceeds 5e-3·max).
    mc = kfac_blocks(net, x, y, loss, "mc", mc=20, repeats=10000)
    for name, block in mc.items():
        ggn = dense_ggn_block(net, name, x, y, loss)
        torch.testing.assert_close(block, ggn, rtol=5e-2, atol=5e-3 * ggn.abs().max().item())


def deep_linear() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 2)).to(DT)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_linear_type2_exact_mc_converges_empirical_not_ef(reduction: str) -> None:
    net = deep_linear()
    x, y = torch.randn(6, 4, dtype=DT), torch.tensor([0, 1, 1, 0, 1, 0])
    type2 = kfac_blocks(net, x, y, "mse", "type2", reduction=reduction)
    if reduction == "mean":  # 2000 copies × 20 samples = 4·10⁴ MC samples
        mc = kfac_blocks(net, x, y, "mse", "mc", mc=20, repeats=2000)
        emp = kfac_blocks(net, x, y, "mse", "empirical")
    for name in type2:
        ggn = dense_ggn_block(net, name, x, y, "mse", reduction)
        torch.testing.assert_close(type2[name], ggn, rtol=1e-10, atol=1e-12)
        if reduction == "mean":
            torch.testing.assert_close(mc[name], ggn, rtol=5e-2, atol=5e-3 * ggn.abs().max().item())
            ef = dense_ef_block(net, name, x, y, "mse")
            assert rel_err(emp[name], ef) > 1e-2, "KFAC-empirical must differ from the EF for N > 1"


def test_mean_vs_sum_scaling() -> None:
    """A is a data mean for both reductions; G (the reduction carrier) is N times larger for sum."""
    net, N = mlp(nn.Tanh), 7
    x, y = torch.randn(N, 5, dtype=DT), torch.randint(0, 2, (N,))
    acc = FactorAccumulator(net, {"0": True, "4": False}, make_loss("ce"))
    acc.accumulate(x, y)
    mean, total = acc.finalize("mean"), acc.finalize("sum")
    for name in mean:
        torch.testing.assert_close(total[name][0], mean[name][0])
        torch.testing.assert_close(total[name][1], N * mean[name][1])
    # bias flag: layer "4" has no appended 1
    assert mean["0"][0].shape == (6, 6) and mean["4"][0].shape == (4, 4)


def tilde_block(H: dict[str, dict[str, Tensor]], name: str) -> Tensor:
    """The Hessian block of W̃ = (W b) in row-major order, from torch.func.hessian's nested dict."""
    wk, bk = f"{name}.weight", f"{name}.bias"
    out, inp = H[wk][wk].shape[:2]
    full = torch.cat([H[wk][wk], H[wk][bk].unsqueeze(-1)], dim=-1)  # (out, in, out, in+1)
    bottom = torch.cat([H[bk][wk], H[bk][bk].unsqueeze(-1)], dim=-1)  # (out, out, in+1)
    full = torch.cat([full, bottom.unsqueeze(1)], dim=1)  # (out, in+1, out, in+1)
    return full.reshape(out * (inp + 1), out * (inp + 1))


def test_lqf_hessian_equals_ggn_at_w0_and_kfac_is_exact() -> None:
    """Hessian of the LQF MSE objective at δ ≠ 0 == GGN of the network at w0; K-FAC of w0 is its K-FAC."""
    net = mlp(nn.LeakyReLU)
    w0 = {k: v.detach() for k, v in net.named_parameters()}
    x, y = torch.randn(3, 5, dtype=DT), torch.tensor([0, 1, 1])

    def f_lin(delta: dict[str, Tensor], inputs: Tensor) -> Tensor:
        out, tangent = jvp(lambda p: functional_call(net, p, (inputs,)), (w0,), (delta,))
        return out + tangent

    def objective(delta: dict[str, Tensor]) -> Tensor:
        return per_sample_loss(f_lin(delta, x), y, "mse").mean()

    torch.manual_seed(3)
    delta = {k: 0.3 * torch.randn_like(v) for k, v in w0.items()}
    H = hessian(objective)(delta)
    name = "2"  # middle layer: its (W, b) Hessian blocks assembled as W̃ = (W b)
    err = (tilde_block(H, name) - dense_ggn_block(net, name, x, y, "mse")).abs().max().item()
    assert err < 1e-12, err
    # with one datum, K-FAC type-2 of the w0 network equals the LQF Hessian block exactly
    x1, y1 = x[:1], y[:1]
    H1 = hessian(lambda d: per_sample_loss(f_lin(d, x1), y1, "mse").mean())(delta)
    kfac = kfac_blocks(net, x1, y1, "mse", "type2")
    for layer in kfac:
        torch.testing.assert_close(kfac[layer], tilde_block(H1, layer), rtol=1e-10, atol=1e-12)


def test_ce_hessian_at_linearized_outputs() -> None:
    """CE: with ``outputs_fn`` the loss Hessian is taken at f_lin(x) while vectors go through the w0 network."""
    net = mlp(nn.Tanh)
    w0 = {k: v.detach() for k, v in net.named_parameters()}
    delta = {k: 0.5 * torch.randn_like(v) for k, v in w0.items()}

    def f_lin(inputs: Tensor) -> Tensor:
        out, tangent = jvp(lambda p: functional_call(net, p, (inputs,)), (w0,), (delta,))
        return out + tangent

    x, y = torch.randn(1, 5, dtype=DT), torch.tensor([1])
    at_lin = kfac_blocks(net, x, y, "ce", "type2", outputs_fn=f_lin)
    at_w0 = kfac_blocks(net, x, y, "ce", "type2")
    for name, block in at_lin.items():
        ggn_lin = dense_ggn_block(net, name, x, y, "ce", outputs=f_lin(x))
        torch.testing.assert_close(block, ggn_lin, rtol=1e-10, atol=1e-12)
        assert rel_err(block, at_w0[name]) > 1e-3


def test_conv_inplace_relu_no_grad_write_and_frozen_net() -> None:
    """Tensor hooks survive in-place activations, nothing writes .grad, and frozen (w0) networks work."""
    def cnn(inplace: bool) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(3, 2, 2, stride=2),
                             nn.Flatten(), nn.Linear(8, 3)).to(DT)

    x, y = torch.randn(4, 2, 4, 4, dtype=DT), torch.tensor([0, 1, 2, 1])
    ref_net, net = cnn(False), cnn(True)
    net.requires_grad_(False)
    layers = {"0": True, "2": True, "4": True}
    results = []
    for model in (ref_net, net):
        acc = FactorAccumulator(model, layers, make_loss("ce"))
        acc.accumulate(x, y)
        results.append(acc.finalize())
        assert all(p.grad is None for p in model.parameters())
    for name in layers:
        for a, b in zip(results[0][name], results[1][name], strict=True):
            torch.testing.assert_close(a, b)


def test_invalid_layers_raise() -> None:
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU())
    with pytest.raises(NotImplementedError, match="groups=1"):
        FactorAccumulator(net, {"0": True}, make_loss("ce"))
    with pytest.raises(TypeError, match="Linear and nn.Conv2d"):
        FactorAccumulator(net, {"1": True}, make_loss("ce"))
    with pytest.raises(ValueError, match="fisher_type"):
        FactorAccumulator(nn.Linear(2, 2), {"": True}, make_loss("ce"), fisher_type="kfac")


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_project_linearized_network(loss: str) -> None:
    """With lqf_exp.linearize: the Hessian of the LQF objective in δ (at δ ≠ 0) is the GGN of the w0 network
    (CE: at the linearized outputs), and K-FAC on ``base_network`` with ``outputs_fn=f_lin`` is its K-FAC."""
    linearize = pytest.importorskip("lqf_exp.linearize")
    from collections import OrderedDict

    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(l1=nn.Linear(5, 4), act=nn.LeakyReLU(), fc=nn.Linear(4, 2))).to(DT)
    lin = linearize.LinearizedNetwork(net)
    with torch.no_grad():
        for d in lin.deltas.values():
            d.normal_(0.0, 0.3)
    x, y = torch.randn(1, 5, dtype=DT), torch.tensor([1])
    layers = lin.curvature_layers()
    acc = FactorAccumulator(lin.base_network, {n: b is not None for n, (_, b) in layers.items()},
                            make_loss(loss, ALPHA))
    acc.accumulate(x, y, outputs_fn=lin)
    for name, (A, G) in acc.finalize().items():
        dw, db = layers[name]
        grad = torch.autograd.grad(per_sample_loss(lin(x), y, loss).mean(), (dw, db), create_graph=True)
        flat = torch.cat([grad[0], grad[1][:, None]], dim=1).reshape(-1)  # W̃ = (δW δb), row-major
        rows = [torch.autograd.grad(g, (dw, db), retain_graph=True) for g in flat]
        H = torch.stack([torch.cat([r[0], r[1][:, None]], dim=1).reshape(-1) for r in rows])
        ggn = dense_ggn_block(net, name, x, y, loss, outputs=lin(x))
        torch.testing.assert_close(H, ggn, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.kron(G, A), H, rtol=1e-10, atol=1e-12)
