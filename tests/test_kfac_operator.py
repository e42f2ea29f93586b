"""KFACOperator without Lightning (float64): its factors and inverses are FactorAccumulator's and KroneckerInverse's,
``precondition`` is the dense ``(G ⊗ A + γI)⁻¹ v``, a new damping offset reuses the eigendecompositions, a state
round trip (and a retarget) gives identical outputs without recomputation, and EKFAC inverts with the corrected
eigenvalues."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn

from lqf_exp.curvature import CurvatureTargets
from lqf_exp.precond import EigenvalueCorrection, FactorAccumulator, KFACOperator, KroneckerInverse

from .helpers.losses import make_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/helpers/runtime.py


DT = torch.float64
LAYERS = {"0": True, "3": False}  # the conv with its bias, the head without


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)).to(DT)


def make_targets(net: nn.Module, offset: float = 0.05) -> CurvatureTargets:
    layers = {n: (net.get_submodule(n).weight, net.get_submodule(n).bias if b else None) for n, b in LAYERS.items()}
    return CurvatureTargets(network=net, layers=layers, loss=make_loss("ce"), constant=False, damping_offset=offset)


def make_batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 2, 5, 5, dtype=DT, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in (3, 4)]


def make_vectors(net: nn.Module) -> dict[str, tuple[Tensor, Tensor | None]]:
    torch.manual_seed(2)
    conv, head = net.get_submodule("0"), net.get_submodule("3")
    return {"0": (torch.randn_like(conv.weight), torch.randn_like(conv.bias)),
            "3": (torch.randn_like(head.weight), None)}


def estimated(eigenvalue_correction: bool = False, net: nn.Module | None = None) -> KFACOperator:
    operator = KFACOperator(make_targets(net or make_net()), damping=1e-2, eigenvalue_correction=eigenvalue_correction)
    operator.estimate(iter(make_batches()))  # a one-shot iterator: EKFAC's second pass must use the held batches
    return operator


def joined(w: Tensor, b: Tensor | None) -> Tensor:
    """W̃ = (W b) as the row-major ``(out, in+1)`` matrix (``(out, in)`` without a bias)."""
    V = w.reshape(w.shape[0], -1)
    return V if b is None else torch.cat([V, b[:, None]], dim=1)


def dense_precondition(A: Tensor, G: Tensor, gamma: float, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(G ⊗ A + γI)⁻¹ rvec(W̃)``, solved densely."""
    V = joined(w, b)
    P = torch.linalg.solve(torch.kron(G, A) + gamma * torch.eye(V.numel(), dtype=DT), V.reshape(-1)).reshape(V.shape)
    return P[:, : w[0].numel()].reshape(w.shape), (P[:, -1] if b is not None else None)


def assert_layers_equal(got: dict, expected: dict) -> None:
    for name, (w, b) in expected.items():
        assert torch.equal(got[name][0], w)
        assert (b is None and got[name][1] is None) or torch.equal(got[name][1], b)


def test_estimate_equals_factor_accumulator_and_kronecker_inverse() -> None:
    operator = estimated()
    acc = FactorAccumulator(make_net(), LAYERS, make_loss("ce"))
    for x, y in make_batches():
        acc.accumulate(x, y)
    assert operator.num_updates == 1 and operator.stats["samples"] == 7 and operator.stats["seconds"] > 0
    assert operator.gamma() == pytest.approx(1e-2 + 0.05)
    for name, (A, G) in acc.finalize(dtype=DT).items():
        torch.testing.assert_close(operator.factors[name][0], A, rtol=1e-12, atol=0)
        torch.testing.assert_close(operator.factors[name][1], G, rtol=1e-12, atol=0)
        expected, inverse = KroneckerInverse(A, G, 1e-2 + 0.05), operator.inverses[name]
        assert inverse.damping == pytest.approx(expected.damping)
        torch.testing.assert_close(inverse.eigenvalues, expected.eigenvalues)
        torch.testing.assert_close(inverse.Q_A @ inverse.Q_A.T, expected.Q_A @ expected.Q_A.T)


@pytest.mark.parametrize("offset", [None, 0.5])
def test_precondition_is_the_dense_damped_inverse_and_damping_offset_keeps_the_eigenbases(
        offset: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    operator = estimated()
    bases = {n: (inv.Q_A, inv.Q_G) for n, inv in operator.inverses.items()}
    if offset is not None:
        def forbidden(*args: object, **kwargs: object) -> None:
            raise AssertionError("an eigendecomposition was recomputed")

        monkeypatch.setattr(torch.linalg, "eigh", forbidden)
        operator.set_damping_offset(offset)
        assert operator.targets.damping_offset == offset
    gamma = 1e-2 + (0.05 if offset is None else offset)
    assert operator.gamma() == pytest.approx(gamma)
    vectors = make_vectors(make_net())
    out = operator.precondition(vectors)
    for name, (w, b) in vectors.items():
        assert operator.inverses[name].Q_A is bases[name][0] and operator.inverses[name].Q_G is bases[name][1]
        pw, pb = dense_precondition(*operator.factors[name], gamma, w, b)
        torch.testing.assert_close(out[name][0], pw, rtol=1e-9, atol=1e-12)
        if b is None:
            assert out[name][1] is None
        else:
            torch.testing.assert_close(out[name][1], pb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("eigenvalue_correction", [False, True])
def test_state_dict_round_trip_and_retarget_give_identical_outputs(
        eigenvalue_correction: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    operator = estimated(eigenvalue_correction)
    vectors = make_vectors(make_net())
    expected = operator.precondition(vectors)
    buffer = io.BytesIO()
    torch.save(operator.state_dict(), buffer)  # as in a checkpoint
    buffer.seek(0)
    state = torch.load(buffer)

    class Forbidden:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("the factors or corrections were recomputed")

    monkeypatch.setattr("lqf_exp.precond.operator.FactorAccumulator", Forbidden)
    monkeypatch.setattr("lqf_exp.precond.operator.EigenvalueCorrection", Forbidden)
    net = make_net()
    restored = KFACOperator(make_targets(copy.deepcopy(net)), damping=1e-2, eigenvalue_correction=eigenvalue_correction)
    restored.load_state_dict(state)
    assert_layers_equal(restored.precondition(vectors), expected)
    assert restored.num_updates == 1 and restored.stats == operator.stats
    assert (restored.corrections is not None) == eigenvalue_correction
    restored.retarget(make_targets(net))  # a new fit's targets: same layers, other tensors
    assert restored.targets.network is net
    assert_layers_equal(restored.precondition(vectors), expected)


def test_eigenvalue_correction_inverts_with_the_corrected_eigenvalues() -> None:
    operator, kfac = estimated(eigenvalue_correction=True), estimated()
    bases = {n: (inv.Q_A, inv.Q_G) for n, inv in kfac.inverses.items()}
    corr = EigenvalueCorrection(make_net(), LAYERS, make_loss("ce"), bases)
    for x, y in make_batches():
        corr.accumulate(x, y)
    s = corr.finalize()
    assert operator.stats["correction_seconds"] > 0 and not operator._batch_cache
    gamma, vectors = operator.gamma(), make_vectors(make_net())
    out = operator.precondition(vectors)
    for name, (w, b) in vectors.items():
        torch.testing.assert_close(operator.corrections[name][2], s[name])
        torch.testing.assert_close(operator.inverses[name].eigenvalues, s[name])
        Q_A, Q_G = bases[name]
        P = Q_G @ ((Q_G.T @ joined(w, b) @ Q_A) / (s[name] + gamma)) @ Q_A.T
        torch.testing.assert_close(joined(*out[name]), P)
    # the conv's K-FAC eigenvalues are not its curvature's diagonal: the correction changed the inverse
    assert not torch.allclose(operator.inverses["0"].eigenvalues, kfac.inverses["0"].eigenvalues, rtol=1e-2)


def test_mc_generator_seed_and_errors() -> None:
    def mc(seed: int) -> Tensor:
        operator = KFACOperator(make_targets(make_net()), fisher_type="mc")
        operator.estimate(make_batches(), generator_seed=seed)
        return operator.factors["3"][1]

    assert torch.equal(mc(0), mc(0)) and not torch.allclose(mc(0), mc(1))
    with pytest.raises(RuntimeError, match="no factors"):
        KFACOperator(make_targets(make_net())).precondition(make_vectors(make_net()))
    with pytest.raises(ValueError, match="fisher_type"):
        KFACOperator(make_targets(make_net()), fisher_type="ef")
    with pytest.raises(ValueError, match="damping"):
        KFACOperator(make_targets(make_net()), damping=0.0)
    bad = make_targets(make_net())
    bad.layers["0"] = (bad.layers["3"][0], None)
    with pytest.raises(ValueError, match="target weight of '0'"):
        KFACOperator(bad)


def test_state_of_the_other_kind() -> None:
    """An EKFAC state serves plain K-FAC with its factors; a K-FAC state leaves EKFAC to estimate both anew."""
    ekfac_state, kfac_state = estimated(True).state_dict(), estimated().state_dict()
    plain = KFACOperator(make_targets(make_net()), damping=1e-2)
    plain.load_state_dict(ekfac_state)
    assert plain.corrections is None
    assert_layers_equal(plain.precondition(make_vectors(make_net())),
                        estimated().precondition(make_vectors(make_net())))
    upgraded = KFACOperator(make_targets(make_net()), eigenvalue_correction=True)
    upgraded.load_state_dict(kfac_state)
    assert upgraded.factors is None and upgraded.num_updates == 1
