"""Mixed precision (``trainer.precision=bf16-mixed``) for every method, on CPU bf16."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.models import SmallResNet
from lqf_exp.pipeline import run
from lqf_exp.results import METRICS_FILE

from .conftest import SMOKE
from .helpers.nets import randomize_bn

# max |f_lin(bf16 autocast) − f_lin(float32)| / max |f_lin(float32)|: bf16 keeps 8 significant bits (≈ 4e-3 per
# rounding); through 7 convolutions the measured error is 5.6e-3.
BF16_TOLERANCE = 2e-2


def linearized(tangent: str = "fused") -> LinearizedNetwork:
    torch.manual_seed(0)
    m = LinearizedNetwork(randomize_bn(SmallResNet(num_classes=10), 0), tangent=tangent)
    with torch.no_grad():
        for d in m.delta_list():
            d.normal_(0, 1e-2)
    return m


def test_f_lin_in_bf16_agrees_with_float32_and_delta_gradients_stay_float32() -> None:
    m = linearized()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        reference = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        primal, tangent = m(x, split=True)
        out = primal + tangent
    assert primal.dtype == tangent.dtype == torch.bfloat16
    error = float((out.float() - reference).abs().max()) / float(reference.abs().max())
    assert error <= BF16_TOLERANCE
    assert float(tangent.float().abs().max()) > 0.05 * float(reference.abs().max())  # δ contributes visibly
    (out.float().pow(2).sum()).backward()
    assert all(d.grad is not None and d.grad.dtype == torch.float32 for d in m.delta_list())


def test_autodiff_tangent_refuses_autocast_with_a_clear_error() -> None:
    m = linearized("autodiff")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="method.tangent=fused"):
        m(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(
    "overrides",
    # the smoke net has random weights: K-FAC fine-tuning at the recipe's lr diverges in float32 as well
    [["method=lqf"], ["method=finetune", "precond=kfac", "optim.lr=1e-4"], ["method=probe"]],
    ids=["lqf", "finetune-kfac", "probe"],
)
def test_every_method_runs_in_bf16_mixed(overrides: list[str], make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg([*SMOKE, *overrides, "trainer.precision=bf16-mixed", "trainer.limit_train_batches=2"])
    run(cfg)
    written = json.loads((tmp_path / "run" / METRICS_FILE).read_text())
    assert written["status"] == "finished"
    assert 0.0 <= written["metrics"]["test/acc"] <= 1.0
    assert math.isfinite(written["metrics"]["test/loss"])
