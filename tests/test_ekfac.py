"""EKFAC (float64): the corrected eigenvalues are the exact GGN diagonal in the Kronecker eigenbasis (dense blocks
from torch.func), agree with curvlinops' EKFACLinearOperator, drive the callback's preconditioner, survive a
state_dict round trip without recomputation, and all-reduce across two gloo processes to the single-process ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from lqf_exp.precond import EigenvalueCorrection, FactorAccumulator, KroneckerInverse

from .helpers.losses import make_loss
from .helpers.runtime import free_port
from .test_kfac_exactness import ALPHA, dense_ef_block, dense_ggn_block

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/helpers/runtime.py

# Lightning (the callback, the toy Trainer of test_kfac_callback) is imported inside the callback tests only: the
# spawned workers of the two-process test import this module, and Lightning would add seconds to each.

DT = torch.float64
C = 3


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, C)).to(DT)


def cnn(head: str = "flatten") -> nn.Module:
    torch.manual_seed(0)
    pool = [nn.Flatten(), nn.Linear(16, C)] if head == "flatten" else [nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                                       nn.Linear(4, C)]
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(3, 4, 3, stride=2),
                         nn.LeakyReLU(0.1), *pool).to(DT)


def layers_of(net: nn.Module) -> dict[str, bool]:
    return {n: True for n, m in net.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


def batches(image: bool, sizes: tuple[int, ...] = (3, 4)) -> list[tuple[Tensor, Tensor]]:
    torch.manual_seed(1)
    shape = (2, 6, 6) if image else (5,)
    return [(torch.randn(n, *shape, dtype=DT), torch.randint(0, C, (n,))) for n in sizes]


def ekfac(net: nn.Module, data: list[tuple[Tensor, Tensor]], loss: str, fisher: str = "type2", approx: str = "expand",
          bases: dict[str, tuple[Tensor, Tensor]] | None = None, chunk_elements: int = 2**26,
          ) -> tuple[dict[str, KroneckerInverse], dict[str, Tensor]]:
    """K-FAC inverses (their eigenbases) and the corrected eigenvalues (in ``bases`` when given) over ``data``."""
    layers, loss_fn = layers_of(net), make_loss(loss, ALPHA)
    acc = FactorAccumulator(net, layers, loss_fn, fisher_type=fisher, kfac_approx=approx)
    for x, y in data:
        acc.accumulate(x, y)
    inverses = {n: KroneckerInverse(A, G, 1.0) for n, (A, G) in acc.finalize().items()}
    bases = bases or {n: (inv.Q_A, inv.Q_G) for n, inv in inverses.items()}
    corr = EigenvalueCorrection(net, layers, loss_fn, bases, fisher_type=fisher, chunk_elements=chunk_elements)
    for x, y in data:
        corr.accumulate(x, y)
    return inverses, corr.finalize()


def rotated_diagonal(block: Tensor, inverse: KroneckerInverse) -> Tensor:
    Q = torch.kron(inverse.Q_G, inverse.Q_A)
    return (Q.T @ block @ Q).diagonal().reshape(inverse.eigenvalues.shape)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize(("arch", "approx"), [("mlp", "expand"), ("cnn", "expand"), ("avgpool", "expand"),
                                              ("cnn", "reduce")])
def test_type2_corrections_are_the_exact_ggn_diagonal(arch: str, approx: str, loss: str) -> None:
    net = mlp() if arch == "mlp" else cnn("flatten" if arch == "cnn" else "avgpool")
    data = batches(image=arch != "mlp")
    # tiny chunks: per-sample gradients of the convs are formed one sample at a time
    inverses, s = ekfac(net, data, loss, approx=approx, chunk_elements=1)
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    for name, inverse in inverses.items():
        expected = rotated_diagonal(dense_ggn_block(net, name, x, y, loss), inverse)
        torch.testing.assert_close(s[name], expected, rtol=1e-10, atol=1e-12 * expected.abs().max().item())
    for name in ("0", "2") if arch != "mlp" else ():  # K-FAC's eigenvalues are not the conv curvature's diagonal
        assert not torch.allclose(inverses[name].eigenvalues, s[name], rtol=1e-2)


def test_empirical_corrections_are_the_exact_ef_diagonal_and_chunks_do_not_matter() -> None:
    net, data = cnn(), batches(image=True)
    inverses, s = ekfac(net, data, "mse", fisher="empirical")
    _, s_chunked = ekfac(net, data, "mse", fisher="empirical", chunk_elements=500)
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    for name, inverse in inverses.items():
        expected = rotated_diagonal(dense_ef_block(net, name, x, y, "mse"), inverse)
        torch.testing.assert_close(s[name], expected, rtol=1e-10, atol=1e-12 * expected.abs().max().item())
        torch.testing.assert_close(s_chunked[name], s[name], rtol=1e-12, atol=0.0)


def test_exact_kronecker_block_keeps_kfac_eigenvalues() -> None:
    """One datum through an MLP: K-FAC is exact, so EKFAC's eigenvalues are K-FAC's."""
    net = mlp()
    inverses, s = ekfac(net, [batches(image=False, sizes=(1,))[0]], "ce")
    for name, inverse in inverses.items():
        torch.testing.assert_close(s[name], inverse.eigenvalues, rtol=1e-9, atol=1e-12)


def test_bad_bases_and_eigenvalues_raise() -> None:
    net = mlp()
    eye = torch.eye(6, dtype=DT)
    with pytest.raises(ValueError, match="no eigenbasis"):
        EigenvalueCorrection(net, {"0": True, "2": True}, make_loss("ce"), {"0": (eye, torch.eye(4, dtype=DT))})
    with pytest.raises(ValueError, match=r"layer '0' has Q_A \(6, 6\).*expected \(5, 5\)"):
        EigenvalueCorrection(net, {"0": False}, make_loss("ce"), {"0": (eye, torch.eye(4, dtype=DT))})
    inverse = KroneckerInverse(torch.eye(6, dtype=DT), torch.eye(4, dtype=DT), 1e-3)
    with pytest.raises(ValueError, match=r"shape \(out, in\[\+1\]\) = \(4, 6\), got \(6, 4\)"):
        inverse.with_eigenvalues(torch.ones(6, 4, dtype=DT))
    with pytest.raises(ValueError, match="finite and >= 0"):
        inverse.with_eigenvalues(-torch.ones(4, 6, dtype=DT))


def test_corrected_inverse_and_damping() -> None:
    torch.manual_seed(0)
    A, G = (lambda X: X @ X.T)(torch.randn(5, 5, dtype=DT)), (lambda X: X @ X.T)(torch.randn(3, 3, dtype=DT))
    s = torch.rand(3, 5, dtype=DT)
    inverse = KroneckerInverse(A, G, 1e-2).with_eigenvalues(s)
    restored = KroneckerInverse.from_eigenbasis(inverse.Q_A, inverse.Q_G, s, 1e-2)
    Q = torch.kron(inverse.Q_G, inverse.Q_A)
    V = torch.randn(3, 5, dtype=DT)
    for gamma in (1e-2, 0.5):
        dense = Q @ torch.diag(1.0 / (s.reshape(-1) + gamma)) @ Q.T @ V.reshape(-1)
        for inv in (inverse.with_damping(gamma), restored.with_damping(gamma)):
            torch.testing.assert_close(inv.apply(V).reshape(-1), dense, rtol=1e-10, atol=1e-12)


# -- curvlinops oracle ------------------------------------------------------------------------------------------
def test_matches_curvlinops_ekfac() -> None:
    """Scaling map as in test_kfac_curvlinops: our MSE is C × curvlinops' mean MSE (s_ours = C·s_cl), CE agrees."""
    curvlinops = pytest.importorskip("curvlinops")
    for loss in ("ce", "mse"):
        net, data = cnn(), batches(image=True)
        if loss == "ce":
            loss_func, cl_data, scale = nn.CrossEntropyLoss(), data, 1.0
        else:
            loss_func, scale = nn.MSELoss(), float(C)
            cl_data = [(x, ALPHA * F.one_hot(y, C).to(DT)) for x, y in data]
        K = curvlinops.EKFACLinearOperator(net, loss_func, list(net.parameters()), cl_data, fisher_type="type-2",
                                           kfac_approx="expand", separate_weight_and_bias=False,
                                           check_deterministic=False)
        K._maybe_compute_ekfac()
        theirs = {n: (K._input_covariances_eigenvectors[n], K._gradient_covariances_eigenvectors[n])
                  for n in layers_of(net)}
        _, s_in_theirs = ekfac(net, data, loss, bases=theirs)
        inverses, s = ekfac(net, data, loss)
        for name in theirs:
            torch.testing.assert_close(s_in_theirs[name], scale * K._corrected_eigenvalues[name], rtol=1e-10,
                                       atol=1e-12)
            inverses[name].with_eigenvalues(s[name])

        torch.manual_seed(2)
        vectors = [torch.randn_like(p) for p in net.parameters()]
        products = K @ [v.clone() for v in vectors]
        gamma = 1e-2
        K_inv = curvlinops.KFACInverseLinearOperator(K, damping=gamma / scale, use_exact_damping=True)
        solves = K_inv @ [v.clone() for v in vectors]
        params = dict(zip((n for n, _ in net.named_parameters()), range(len(vectors)), strict=True))
        for name, inverse in inverses.items():
            iw, ib = params[f"{name}.weight"], params[f"{name}.bias"]
            V = torch.cat([vectors[iw].reshape(vectors[iw].shape[0], -1), vectors[ib][:, None]], dim=1)
            rotated = inverse.Q_G.T @ V @ inverse.Q_A
            product = inverse.Q_G @ (rotated * s[name]) @ inverse.Q_A.T  # EKFAC matvec
            solve = inverse.with_damping(gamma).apply(V)
            for mine, cl_w, cl_b, factor in ((product, products[iw], products[ib], scale),
                                             (solve, solves[iw], solves[ib], 1.0 / scale)):
                expected = factor * torch.cat([cl_w.reshape(cl_w.shape[0], -1), cl_b[:, None]], dim=1)
                torch.testing.assert_close(mine, expected, rtol=1e-8, atol=1e-10 * expected.abs().max().item())


# -- the callback -----------------------------------------------------------------------------------------------
def corrections_at_w0(module: nn.Module, bases: dict[str, tuple[Tensor, Tensor]], num_batches: int,
                      ) -> dict[str, Tensor]:
    from .test_kfac_callback import ToyData

    corr = EigenvalueCorrection(module.net, {"0": True, "2": False}, make_loss("mse", 2.0), bases)
    for _, (x, y) in zip(range(num_batches), ToyData().train_dataloader(), strict=False):
        corr.accumulate(x, y)
    return corr.finalize()


def test_callback_preconditions_with_corrected_eigenvalues() -> None:
    from lqf_exp.precond.callback import KFACPreconditioner

    from .test_kfac_callback import ToyModule, factors_at_w0, fit

    module = ToyModule(constant=True)
    w0_factors = factors_at_w0(module, num_batches=2)
    cb = KFACPreconditioner(num_batches=2, damping=1e-3, eigenvalue_correction=True)
    fit(module, cb, steps=3)
    assert cb.num_updates == 1 and cb.stats["correction_seconds"] > 0 and not cb.operator._batch_cache
    bases = {n: (inv.Q_A, inv.Q_G) for n, inv in cb.inverses.items()}
    expected = corrections_at_w0(ToyModule(constant=True), bases, num_batches=2)
    gamma = 1e-3 + 0.01
    for name, inverse in cb.inverses.items():
        torch.testing.assert_close(cb.factors[name][0], w0_factors[name][0])
        torch.testing.assert_close(cb.corrections[name][2], expected[name])
        torch.testing.assert_close(inverse.eigenvalues, expected[name])
    # the MSE head's block is exactly 2I ⊗ A; the first layer's is not a Kronecker product
    assert not torch.allclose(cb.inverses["0"].eigenvalues, KroneckerInverse(*w0_factors["0"], gamma).eigenvalues,
                              rtol=1e-2)
    w0, b0, w2 = 0, 1, 2
    for raw, seen in zip(module.raw, module.seen, strict=True):
        for name, V, got in (("0", torch.cat([raw[w0], raw[b0][:, None]], dim=1),
                              torch.cat([seen[w0], seen[b0][:, None]], dim=1)), ("2", raw[w2], seen[w2])):
            Q_A, Q_G = bases[name]
            P = Q_G @ ((Q_G.T @ V @ Q_A) / (expected[name] + gamma).float()) @ Q_A.T
            torch.testing.assert_close(got, P, rtol=1e-4, atol=1e-6)


def test_callback_state_dict_round_trip_restores_corrections(monkeypatch: pytest.MonkeyPatch) -> None:
    from lqf_exp.precond.callback import KFACPreconditioner

    from .test_kfac_callback import ToyModule, fit

    cb = KFACPreconditioner(num_batches=2, eigenvalue_correction=True)
    fit(ToyModule(constant=True), cb, steps=1)
    state = cb.state_dict()
    assert set(state["corrections"]) == {"0", "2"}

    class Forbidden(EigenvalueCorrection):
        def __init__(self, *args, **kwargs) -> None:
            raise AssertionError("the corrections were recomputed")

    monkeypatch.setattr("lqf_exp.precond.operator.EigenvalueCorrection", Forbidden)
    restored = KFACPreconditioner(num_batches=2, eigenvalue_correction=True)
    restored.load_state_dict(state)
    fit(ToyModule(constant=True), restored, steps=2)
    assert restored.num_updates == 1 and restored.steps == 3 and restored.stats == cb.stats
    for name, (Q_A, Q_G, s) in cb.corrections.items():
        inverse = restored.inverses[name]
        torch.testing.assert_close(inverse.eigenvalues, s)
        torch.testing.assert_close(inverse.Q_A, Q_A)
        torch.testing.assert_close(inverse.Q_G, Q_G)
    monkeypatch.undo()

    # a K-FAC state has no corrections: EKFAC recomputes; an EKFAC state serves plain K-FAC with its factors
    kfac = KFACPreconditioner(num_batches=2)
    fit(ToyModule(constant=True), kfac, steps=1)
    upgraded = KFACPreconditioner(num_batches=2, eigenvalue_correction=True)
    upgraded.load_state_dict(kfac.state_dict())
    fit(ToyModule(constant=True), upgraded, steps=2)
    assert upgraded.num_updates == 2 and upgraded.corrections is not None
    plain = KFACPreconditioner(num_batches=2)
    plain.load_state_dict(state)
    fit(ToyModule(constant=True), plain, steps=2)
    assert plain.corrections is None
    A, G = cb.factors["0"]
    torch.testing.assert_close(plain.inverses["0"].eigenvalues, KroneckerInverse(A, G, 1.0).eigenvalues)


def test_callback_refresh_recomputes_corrections() -> None:
    from lqf_exp.precond.callback import KFACPreconditioner

    from .test_kfac_callback import ToyModule, fit

    module = ToyModule(constant=False)
    cb = KFACPreconditioner(num_batches=2, update_every=2, eigenvalue_correction=True)
    fit(module, cb, steps=5)
    assert cb.num_updates == 3 and not cb.operator._batch_cache
    raw, seen = module.raw[4], module.seen[4]  # step 4 used the latest, corrected, inverse
    torch.testing.assert_close(seen[2], cb.inverses["2"].apply(raw[2]))
    torch.testing.assert_close(cb.inverses["2"].eigenvalues, cb.corrections["2"][2])


def test_eigenvalue_correction_must_be_a_bool(tmp_path: Path) -> None:
    from lqf_exp.precond.callback import KFACPreconditioner

    with pytest.raises(ValueError, match="eigenvalue_correction must be true or false, got 'yes'"):
        KFACPreconditioner(eigenvalue_correction="yes")  # type: ignore[arg-type]
    from lqf_exp.validation import ConfigError, validate_config

    from .conftest import compose_config

    cfg = compose_config(["precond=ekfac"], tmp_path)
    validate_config(cfg)
    assert cfg.precond.name == "ekfac" and cfg.precond.callback.eigenvalue_correction is True
    with pytest.raises(ConfigError, match="precond.callback.eigenvalue_correction=1.*true or false"):
        validate_config(compose_config(["precond=ekfac", "precond.callback.eigenvalue_correction=1"], tmp_path))


# -- two processes ----------------------------------------------------------------------------------------------
def sharded_corrections(shard: list[tuple[Tensor, Tensor]]) -> dict[str, object]:
    net = cnn()
    layers, loss = layers_of(net), make_loss("ce")
    acc = FactorAccumulator(net, layers, loss)
    for x, y in shard:
        acc.accumulate(x, y)
    acc.all_reduce()
    inverses = {n: KroneckerInverse(A, G, 1.0) for n, (A, G) in acc.finalize().items()}
    corr = EigenvalueCorrection(net, layers, loss, {n: (inv.Q_A, inv.Q_G) for n, inv in inverses.items()})
    for x, y in shard:
        corr.accumulate(x, y)
    corr.all_reduce()
    return {"s": corr.finalize(), "count": corr.count}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = batches(image=True, sizes=(3, 5, 2, 4))[rank::world]
        torch.save(sharded_corrections(shard), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_corrections_equal_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = sharded_corrections(batches(image=True, sizes=(3, 5, 2, 4)))
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert res["count"] == single["count"] == 14
        for name, s in single["s"].items():
            torch.testing.assert_close(res["s"][name], s, rtol=1e-10, atol=1e-14)
