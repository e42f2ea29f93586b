"""K-FAC for Linear layers shared across tokens (Eschenhagen et al., NeurIPS 2023: expand and reduce), in float64.

- against curvlinops' ``KFACLinearOperator`` with the matching ``kfac_approx`` on a small transformer (every Linear
  layer, attention projections and MLPs applied to all tokens);
- against the dense GGN where K-FAC is exact: the head (MSE, one output position per sample), and a Linear layer
  applied to every token and mean-pooled (the reduce setting, MSE) for ``reduce``. For the other layers the distance
  to the dense GGN block is printed, not asserted (K-FAC is an approximation there).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lqf_exp.precond import FactorAccumulator

from .helpers.losses import make_loss
from .helpers.transformer import ToyTransformer

curvlinops = pytest.importorskip("curvlinops")

DT = torch.float64
ALPHA, C = 2.0, 3


def transformer() -> nn.Module:
    torch.manual_seed(0)
    return ToyTransformer(dim=6, tokens=4, classes=C).to(DT)


def linear_layers(net: nn.Module) -> dict[str, bool]:
    return {name: True for name, m in net.named_modules() if isinstance(m, nn.Linear)}


def data(tokens: int = 4) -> list[tuple[Tensor, Tensor]]:
    torch.manual_seed(1)
    return [(torch.randn(n, tokens, 4, dtype=DT), torch.randint(0, C, (n,))) for n in (3, 2)]


def ours(net: nn.Module, layers: dict[str, bool], approx: str) -> dict[str, tuple[Tensor, Tensor]]:
    accumulator = FactorAccumulator(net, layers, make_loss("mse", ALPHA), kfac_approx=approx)
    for x, y in data():
        accumulator.accumulate(x, y)
    return accumulator.finalize("mean")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_token_shared_linear_factors_match_curvlinops(approx: str) -> None:
    net = transformer()
    layers = linear_layers(net)
    params = [p for name in layers for p in net.get_submodule(name).parameters()]
    batches = [(x, ALPHA * F.one_hot(y, C).to(DT)) for x, y in data()]
    oracle = curvlinops.KFACLinearOperator(net, nn.MSELoss(), params, batches, fisher_type="type-2",
                                           kfac_approx=approx, separate_weight_and_bias=False,
                                           check_deterministic=False)
    oracle.compute_kronecker_factors()
    for name, (A, G) in ours(net, layers, approx).items():
        # our MSE sums over the C outputs, curvlinops' MSELoss averages them: G differs by the factor C
        torch.testing.assert_close(A, oracle._input_covariances[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(G, C * oracle._gradient_covariances[name], rtol=1e-10, atol=1e-12)


def dense_ggn_block(net: nn.Module, layer: nn.Linear, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    """The GGN block of ``(W b)`` (row-major ``(out, in+1)``) of the mean MSE loss: (1/N) Σ_n J_nᵀ (2I) J_n."""
    point = {"weight": layer.weight.detach(), "bias": layer.bias.detach()}
    names = {id(layer.weight): "weight", id(layer.bias): "bias"}
    prefix = next(n for n, m in net.named_modules() if m is layer)
    total, count = 0.0, 0
    for x, _ in batches:
        def outputs(p: dict[str, Tensor], x: Tensor = x) -> Tensor:
            return torch.func.functional_call(net, {f"{prefix}.{k}": v for k, v in p.items()}, (x,))

        jac = torch.func.jacrev(outputs)(point)  # [N, C, out, in] and [N, C, out]
        rows = torch.cat([jac["weight"], jac["bias"][..., None]], dim=-1).flatten(2)  # [N, C, out·(in+1)]
        total = total + 2.0 * torch.einsum("ncp,ncq->pq", rows, rows)
        count += len(x)
    assert len(names) == 2
    return total / count


def test_the_head_block_is_exact() -> None:
    net = transformer()
    A, G = ours(net, {"head": True}, "expand")["head"]
    torch.testing.assert_close(torch.kron(G, A), dense_ggn_block(net, net.head, data()), rtol=1e-10, atol=1e-12)


class PooledTokens(nn.Module):
    """A Linear layer applied to every token, then the mean over tokens: the reduce setting."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.shared(x).mean(dim=1)


def test_reduce_is_exact_where_the_tokens_are_pooled_and_expand_is_not() -> None:
    torch.manual_seed(0)
    net = PooledTokens().to(DT)
    exact = dense_ggn_block(net, net.shared, data())
    A, G = ours(net, {"shared": True}, "reduce")["shared"]
    torch.testing.assert_close(torch.kron(G, A), exact, rtol=1e-10, atol=1e-12)
    A, G = ours(net, {"shared": True}, "expand")["shared"]
    distance = float((torch.kron(G, A) - exact).norm() / exact.norm())
    print(f"K-FAC expand on the pooled layer: relative distance to the GGN block {distance:.3f}")
    assert distance > 1e-3  # an approximation here, as the paper says


def test_distance_of_each_transformer_layer_to_its_ggn_block() -> None:
    """Printed (``pytest -s``), not asserted, except the head, where K-FAC is exact."""
    net = transformer()
    batches = data()
    for approx in ("expand", "reduce"):
        for name, (A, G) in ours(net, linear_layers(net), approx).items():
            exact = dense_ggn_block(net, net.get_submodule(name), batches)
            distance = float((torch.kron(G, A) - exact).norm() / exact.norm())
            print(f"K-FAC {approx:6s} {name:24s} relative distance to the GGN block {distance:.3f}")
            assert distance < 1e-10 if name == "head" else distance == distance  # the head: exact; others: finite
