"""``RunIf``: skip a test unless the hardware it needs is there, and mark GPU tests ``gpu`` (Lightning-style).

    @RunIf(min_gpus=1)                      # skipped without CUDA, selected by ``pytest -m gpu``
    def test_on_cuda() -> None: ...

    pytestmark = RunIf(min_gpus=1, bf16_cuda=True).marks   # the same for a whole module

The ``gpu`` mark is what ``benchmarks/gpu_check.py`` selects, so a test that needs CUDA must carry it: otherwise a GPU
readiness run would not see it, and on the CPU-only CI it would only ever be skipped.
"""

from __future__ import annotations

from typing import TypeVar

import pytest
import torch

T = TypeVar("T")


class RunIf:
    """Skip conditions for a test; ``min_gpus >= 1`` also adds the ``gpu`` mark.

    Args:
        min_gpus: CUDA devices the test needs.
        bf16_cuda: needs bfloat16 support on the current CUDA device (Ampere and later).
        triton: needs Triton (``torch.compile``'s inductor generates Triton kernels on CUDA).
    """

    def __init__(self, min_gpus: int = 0, bf16_cuda: bool = False, triton: bool = False) -> None:
        reasons = []
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < min_gpus:
            reasons.append(f"needs {min_gpus} CUDA device(s), found {gpus}")
        if bf16_cuda and not (gpus and torch.cuda.is_bf16_supported()):
            reasons.append("needs a CUDA device with bfloat16")
        if triton and not _has_triton():
            reasons.append("needs triton (torch.compile on CUDA)")
        self.marks: list[pytest.MarkDecorator] = [pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))]
        if min_gpus > 0 or bf16_cuda:
            self.marks.append(pytest.mark.gpu)

    def __call__(self, obj: T) -> T:
        """Apply every mark to a test function or class."""
        for mark in self.marks:
            obj = mark(obj)
        return obj


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True

