"""The linearized network on CUDA: fused tangent against forward-mode AD, bf16 autocast, ``torch.compile``.

Every test here needs CUDA (``RunIf(min_gpus=1)``: skipped without it, marked ``gpu``); ``benchmarks/gpu_check.py``
runs them with ``pytest -m gpu``. The CPU versions of the first two checks are in test_tangent.py and
test_precision.py; what is new here is the CUDA kernels (cuDNN convolutions, TF32 defaults, inductor's code).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator

import pytest
import torch
import torchvision
from torch import Tensor, nn

from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.models import SmallResNet

from .helpers.nets import randomize_bn
from .helpers.run_if import RunIf

pytestmark = RunIf(min_gpus=1).marks

FP32_RTOL = 1e-4  # fused vs forward-mode AD in float32: different kernel orders, the same arithmetic
BF16_RTOL = 5e-2  # bf16 keeps 8 significant bits; through a ResNet the error is a few 1e-3 (test_precision.py)
COMPILE_RTOL = 1e-5  # inductor fuses the element-wise ops but calls the same cuDNN convolutions as eager


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """TF32 off: cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa, ~1e-3 relative), which would
    drown the 1e-4 / 1e-5 agreements checked here in rounding that both sides make differently."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(SmallResNet(num_classes=4), 1)


def resnet18() -> nn.Module:
    """torchvision's ResNet-18 with Leaky-ReLU, as LQF runs it."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5)
    for module in list(net.modules()):
        for attr, sub in list(module.named_children()):
            if isinstance(sub, nn.ReLU):
                setattr(module, attr, nn.LeakyReLU(0.1))
    return randomize_bn(net, 0)


def batch(n: int = 4, size: int = 32, seed: int = 1) -> Tensor:
    """Drawn on the CPU, so every device sees the same numbers."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).cuda()


def direction(lin: LinearizedNetwork, seed: int = 3, scale: float = 1e-2) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(d.shape, generator=g)).cuda() for d in lin.delta_list()]


def relative(got: Tensor, want: Tensor) -> float:
    return float((got.float() - want.float()).abs().max()) / max(float(want.float().abs().max()), 1e-30)


@pytest.mark.parametrize("make", [small_resnet, resnet18], ids=["small_resnet", "resnet18"])
def test_fused_jvp_and_gradient_match_forward_mode_ad(make: Callable[[], nn.Module], exact_fp32: None) -> None:
    net = make().cuda()
    fused = LinearizedNetwork(net, tangent="fused")
    autodiff = LinearizedNetwork(copy.deepcopy(net), tangent="autodiff")
    x, v = batch(), direction(fused)
    with torch.no_grad():
        for what, got, want in zip(("f(x; w0)", "J·v"), fused.jvp(x, v), autodiff.jvp(x, v), strict=True):
            assert relative(got, want) <= FP32_RTOL, what
    # the backward half (Jᵀu), with δ = v
    target = torch.randn(x.shape[0], net.fc.out_features, generator=torch.Generator().manual_seed(5)).cuda()
    grads = []
    for lin in (fused, autodiff):
        with torch.no_grad():
            for d, t in zip(lin.delta_list(), v, strict=True):
                d.copy_(t)
        loss = (lin(x) - target).pow(2).sum()
        grads.append(torch.autograd.grad(loss, lin.delta_list()))
    for name, got, want in zip(fused.delta_named(), *grads, strict=True):
        assert relative(got, want) <= FP32_RTOL, name


def test_fused_first_call_check_passes_under_default_tf32(caplog: pytest.LogCaptureFixture) -> None:
    """PyTorch's defaults run cuDNN convolutions in TF32. The fused path checks itself against forward-mode AD on its
    first call (1e-4 in float32); if TF32 rounding failed that check, ``tangent=auto`` (the default) would fall back
    to the slower autodiff path on every GPU run, and ``tangent=fused`` would raise. Neither may happen."""
    lin = LinearizedNetwork(resnet18().cuda(), tangent="fused")
    with torch.no_grad():
        lin(batch())  # raises RuntimeError when the first-call check fails
    auto = LinearizedNetwork(resnet18().cuda(), tangent="auto")
    with caplog.at_level(logging.WARNING), torch.no_grad():
        auto(batch())
    fallbacks = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not fallbacks, f"tangent=auto fell back to forward-mode AD on CUDA: {fallbacks}"


@RunIf(min_gpus=1, bf16_cuda=True)
def test_fused_jvp_under_bf16_autocast_is_close_to_float32(exact_fp32: None) -> None:
    lin = LinearizedNetwork(small_resnet().cuda(), tangent="fused")
    x, v = batch(8), direction(lin)
    with torch.no_grad():
        reference = lin.jvp(x, v)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = lin.jvp(x, v)
    assert low[1].dtype == torch.bfloat16  # autocast reached the tangent stream
    for what, got, want in zip(("f(x; w0)", "J·v"), low, reference, strict=True):
        assert relative(got, want) <= BF16_RTOL, what
    assert float(reference[1].abs().max()) > 0  # the tangent is not trivially zero


@RunIf(min_gpus=1, triton=True)
def test_compiled_linearized_network_matches_eager(exact_fp32: None) -> None:
    lin = LinearizedNetwork(small_resnet().cuda(), tangent="fused")
    with torch.no_grad():
        for d, t in zip(lin.delta_list(), direction(lin), strict=True):
            d.copy_(t)
    x = batch(8)
    target = torch.randn(8, 4, generator=torch.Generator().manual_seed(5)).cuda()

    def forward_backward(module: nn.Module) -> tuple[Tensor, tuple[Tensor, ...]]:
        out = module(x)
        return out.detach(), torch.autograd.grad((out - target).pow(2).sum(), lin.delta_list())

    # eager first: the first-call checks (forward order, fused against autodiff) run eagerly, as in training
    eager_out, eager_grads = forward_backward(lin)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lin, fullgraph=True)
        for _ in range(2):  # the second call runs the cached graph
            out, grads = forward_backward(compiled)
            assert relative(out, eager_out) <= COMPILE_RTOL
            for name, got, want in zip(lin.delta_named(), grads, eager_grads, strict=True):
                assert relative(got, want) <= COMPILE_RTOL, name
    finally:
        torch._dynamo.reset()
