"""B-LQF / MPN-COV pooling (``model.pooling=sqrt_cov``): the Newton–Schulz root, the module, the network, runs."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.func import functional_call

from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.models import build_network, save_network_checkpoint
from lqf_exp.models import weights as W
from lqf_exp.models.pooling import POOLINGS, SqrtCovPooling, covariance, sqrtm_newton_schulz, upper_triangle
from lqf_exp.pipeline import build_module, run
from lqf_exp.validation import ConfigError, validate_config

from .conftest import REPO_ROOT, SMOKE
from .helpers.nets import randomize_bn

LEAKY = {"name": "leaky_relu"}
# The probe's l2 fixed: its leave-one-out choice eigendecomposes a D×D matrix, D = 2080 here (half a minute on CPU).
FIXED_PROBE = ["method.head_init_l2=1e-3"]


def eigh_sqrt(sigma: Tensor) -> Tensor:
    w, v = torch.linalg.eigh(sigma)
    return (v * w.clamp_min(0).sqrt()[..., None, :]) @ v.transpose(-1, -2)


def rel_err(a: Tensor, b: Tensor) -> float:
    """Largest per-matrix relative Frobenius error over the batch."""
    return ((a - b).norm(dim=(-2, -1)) / b.norm(dim=(-2, -1))).max().item()


def random_spd(batch: int, d: int, lowest: float, seed: int = 0) -> Tensor:
    """SPD matrices with eigenvalues uniform in [lowest, 1]·3.7 (a scale the trace normalization must undo)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, d, d, generator=g, dtype=torch.float64))
    w = lowest + (1 - lowest) * torch.rand(batch, d, generator=g, dtype=torch.float64)
    return 3.7 * (q * w[:, None, :]) @ q.transpose(1, 2)


def small_resnet(pooling: str = "sqrt_cov", seed: int = 0, classes: int = 10, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_network("small_resnet", classes, LEAKY, weights="packaged", pooling=pooling, **kw)


# ---------------------------------------------------------------- the matrix square root
@pytest.mark.parametrize(("d", "lowest"), [(8, 0.1), (16, 0.05), (32, 0.01)])
def test_newton_schulz_converges_to_the_eigh_root(d: int, lowest: float) -> None:
    sigma = random_spd(4, d, lowest)
    root = sqrtm_newton_schulz(sigma, iterations=25)  # converged after ~15 at these condition numbers
    assert rel_err(root @ root, sigma) < 1e-12
    assert rel_err(root, eigh_sqrt(sigma)) < 1e-12


def test_five_iterations_on_small_resnet_features_are_an_approximate_root(make_cfg) -> None:
    """Realistic Σ: 64-channel layer3 maps (8×8) of the packaged small_resnet on digits. Its trace-normalized
    eigenvalues spread from ~0.25 down to 0 (rank ≤ 63), and a small eigenvalue needs ~log(1/a)/log(2.25)
    steps, so iSQRT-COV's 5 steps leave a ~20% error (measured 0.20 on this batch); 30 steps reach ~3e-9."""
    datamodule = instantiate(make_cfg([]).data)
    datamodule.setup("fit")
    images, _ = next(iter(datamodule.train_dataloader()))
    net = small_resnet("avg").double().eval()
    maps: list[Tensor] = []
    net.layer3.register_forward_hook(lambda _m, _i, out: maps.append(out))
    with torch.no_grad():
        net(images.double())
    sigma = covariance(maps[0].flatten(2))
    exact = eigh_sqrt(sigma)
    errors = [rel_err(sqrtm_newton_schulz(sigma, k), exact) for k in (3, 5, 8, 10, 15, 20, 30)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[1] < 0.25
    assert errors[-1] < 1e-7


def test_zero_covariance_gives_zeros_and_a_finite_gradient() -> None:
    x = torch.ones(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)  # constant features: Σ = 0
    out = SqrtCovPooling(3).double()(x)
    assert torch.equal(out, torch.zeros_like(out))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all()


def test_bad_iterations_and_single_position_map() -> None:
    with pytest.raises(ValueError, match="iterations must be an integer >= 1, got 0"):
        sqrtm_newton_schulz(torch.eye(2)[None], iterations=0)
    with pytest.raises(ValueError, match="at least 2 positions, got 1x1"):
        SqrtCovPooling(4)(torch.randn(2, 4, 1, 1))


# ---------------------------------------------------------------- the module
@pytest.mark.parametrize(("reduce_dim", "d"), [(None, 6), (4, 4)])
def test_output_is_the_upper_triangle_of_the_root(reduce_dim: int | None, d: int) -> None:
    torch.manual_seed(0)
    pool = SqrtCovPooling(6, reduce_dim=reduce_dim).double().eval()
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    out = pool(x)
    assert pool.out_features == d * (d + 1) // 2 and out.shape == (3, d * (d + 1) // 2)
    features = x if pool.reduce is None else pool.reduce(x)
    root = sqrtm_newton_schulz(covariance(features.flatten(2)), 5)
    torch.testing.assert_close(root, root.transpose(1, 2), rtol=0, atol=1e-12)
    rows, cols = torch.triu_indices(d, d)
    assert torch.equal(out, upper_triangle(root)) and torch.equal(out[:, 1], root[:, rows[1], cols[1]])


def test_jvp_matches_autograd_and_finite_differences() -> None:
    torch.manual_seed(0)
    pool = randomize_bn(SqrtCovPooling(6, reduce_dim=4), seed=1).double().eval()
    params = {n: p.detach() for n, p in pool.named_parameters()}
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    dp = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    dx = torch.randn(x.shape, generator=g, dtype=x.dtype)

    def f(p: dict[str, Tensor], inp: Tensor) -> Tensor:
        return functional_call(pool, p, (inp,))

    _, forward = torch.func.jvp(f, (params, x), (dp, dx))
    names = list(params)

    def flat(*args: Tensor) -> Tensor:
        return f(dict(zip(names, args[:-1], strict=True)), args[-1])

    # Reverse-over-reverse (the double-backward trick), independent of forward-mode AD.
    _, reverse = torch.autograd.functional.jvp(flat, (*params.values(), x), (*dp.values(), dx))
    torch.testing.assert_close(forward, reverse, rtol=1e-10, atol=1e-12)
    h = 1e-6
    moved = [f({n: p + s * h * dp[n] for n, p in params.items()}, x + s * h * dx) for s in (1, -1)]
    assert ((moved[0] - moved[1]) / (2 * h) - forward).norm() / forward.norm() < 1e-7


# ---------------------------------------------------------------- the network
def test_built_network_runs_and_linearizes_exactly() -> None:
    net = small_resnet().double()
    assert isinstance(net.avgpool, SqrtCovPooling) and net.fc.in_features == 64 * 65 // 2 == 2080
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    expected = copy.deepcopy(net).eval()(x)
    assert expected.shape == (3, 10)
    m = LinearizedNetwork(net)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, rtol=0, atol=1e-12)  # f_lin(δ = 0) = f(x; w0)
        g = torch.Generator().manual_seed(1)
        for d in m.deltas.values():
            d.copy_(1e-2 * torch.randn(d.shape, generator=g, dtype=d.dtype))
        _, tangent = m(x, split=True)
        params = dict(m.net.named_parameters())
        at: Callable[[float], Tensor] = lambda h: functional_call(  # noqa: E731
            m.net, {n: params[n] + h * d for n, d in m.delta_named().items()}, (x,)
        )
        fd = (at(1e-6) - at(-1e-6)) / 2e-6
    assert (fd - tangent).norm() / tangent.norm() < 1e-6


def test_weights_load_backbone_and_leave_reduction_and_head_new(tmp_path: Path) -> None:
    state, _ = W.read_checkpoint(W.packaged_checkpoint_path("small_resnet", "leaky_relu"))
    # 5 classes, as the packaged head: only fc.weight changes size, yet the whole head must be new.
    net = small_resnet(classes=5, pooling_reduce_dim=8)
    own = net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert not torch.equal(own["fc.bias"], state["fc.bias"])
    same, other = (small_resnet(seed=s, classes=5, pooling_reduce_dim=8).avgpool.reduce[0].weight for s in (0, 1))
    assert torch.equal(own["avgpool.reduce.0.weight"], same)  # a function of the seed, so rebuildable
    assert not torch.equal(same, other)
    # A checkpoint saved with the reduction restores it; an avg network refuses it.
    path = save_network_checkpoint(net, tmp_path / "cov.pt", "small_resnet", "leaky_relu", {})
    again = build_network("small_resnet", 5, LEAKY, weights=path, pooling="sqrt_cov", pooling_reduce_dim=8)
    assert all(torch.equal(v, own[k]) for k, v in again.state_dict().items())
    with pytest.raises(ValueError, match="unexpected: avgpool.reduce"):
        build_network("small_resnet", 5, LEAKY, weights=path)


def test_bad_pooling_values_are_named() -> None:
    with pytest.raises(ValueError, match=r"Unknown pooling 'max'; valid options are: avg, sqrt_cov"):
        build_network("small_resnet", 3, LEAKY, pooling="max")
    with pytest.raises(ValueError, match="pooling_reduce_dim must be null or an integer >= 1, got 0"):
        build_network("small_resnet", 3, LEAKY, pooling="sqrt_cov", pooling_reduce_dim=0)
    with pytest.raises(ValueError, match="pooling_iterations must be an integer >= 1, got 2.5"):
        build_network("small_resnet", 3, LEAKY, pooling="sqrt_cov", pooling_iterations=2.5)


@pytest.mark.parametrize(
    ("override", "named"),
    [*((f"model.pooling={p}", None) for p in POOLINGS), ("model.pooling=max", "model.pooling='max'"),
     ("model.pooling_reduce_dim=0", "model.pooling_reduce_dim=0"),
     ("model.pooling_iterations=0", "model.pooling_iterations=0")],
)
def test_config_validation(override: str, named: str | None, make_cfg) -> None:
    cfg = make_cfg([override])
    if named is None:  # every option of lqf_exp.models.pooling.POOLINGS passes the config check
        validate_config(cfg)
    else:
        with pytest.raises(ConfigError, match=f"invalid config value {named}: expected"):
            validate_config(cfg)


# ---------------------------------------------------------------- configs and runs
def test_table2_cells_compose(make_cfg) -> None:
    pooling = {"nlft": "avg", "mpn_cov": "sqrt_cov", "lqf": "avg", "b_lqf": "sqrt_cov"}
    base = {"nlft": "FineTune", "mpn_cov": "FineTune", "lqf": "LQF", "b_lqf": "LQF"}
    sweeps = {name: yaml.safe_load((REPO_ROOT / "sweeps" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
              for name in ("table1", "table2", "table2_solved")}
    assert sweeps["table2"]["experiment"] == "nlft,mpn_cov" and sweeps["table2_solved"]["experiment"] == "lqf,b_lqf"
    # The paper's Table 2 NLFT is its Table 1 NLFT: same grid.
    assert {k: v for k, v in sweeps["table2"].items() if k not in ("data", "experiment")} == {
        k: v for k, v in sweeps["table1"].items() if k not in ("data", "experiment")
    }
    for sweep, experiment in [("table2", "nlft"), ("table2", "mpn_cov"), ("table2_solved", "lqf"),
                              ("table2_solved", "b_lqf")]:
        cfg = make_cfg([f"+sweep={sweep}", "data=cub200", f"experiment={experiment}"])
        assert cfg.model.arch == "resnet50" and cfg.model.pooling == pooling[experiment] and cfg.recipe == experiment
        assert cfg.method._target_.endswith(base[experiment]) and cfg.data.name == "cub200"
        validate_config(cfg)


@pytest.mark.parametrize("recipe", [["method=lqf", *FIXED_PROBE], ["experiment=nlft"]], ids=["lqf", "nlft"])
def test_one_batch_run(recipe: list[str], make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg([*SMOKE, *recipe, "model.pooling=sqrt_cov"])
    payload = run(cfg)
    assert payload["status"] == "finished" and 0 <= payload["metrics"]["test/acc"] <= 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "finished"
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)  # what the run trained: 64 channels, no reduction, 2080 features
    net = module.linearized.base_network if recipe[0] == "method=lqf" else module.net
    assert isinstance(net.avgpool, SqrtCovPooling) and net.fc.in_features == 2080


def test_lqf_checkpoint_rebuilds_the_seeded_reduction(make_cfg, tmp_path: Path) -> None:
    """The reduction conv is part of w0 but not of the checkpoint: rebuilt from the config and the seed, it must
    reproduce the run's own test result."""
    overrides = [*SMOKE, "method=lqf", "model.pooling=sqrt_cov", "model.pooling_reduce_dim=8", "loss=mse"]
    metrics = run(make_cfg(overrides))["metrics"]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("net.net.avgpool.") for k in checkpoint["state_dict"])
    cfg = make_cfg(overrides)
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    module = build_module(cfg, datamodule)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    images, labels = next(iter(datamodule.test_dataloader()))  # smoke: the one test batch of the run
    with torch.no_grad():
        out = module.eval()(images)
        assert not torch.equal(out, module.linearized.apply_to_base(images))  # δ ≠ 0 was restored
        loss = module.loss_fn(out, labels).item()
    assert (out.argmax(1) == labels).float().mean().item() == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert loss == pytest.approx(metrics["test/loss"], rel=1e-5)
