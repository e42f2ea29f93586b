"""Process-level helpers shared by tests: a free TCP port for gloo process groups, one torch thread for tiny tensors."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch


def free_port() -> int:
    """A TCP port nothing listens on now (for a two-process gloo group on localhost)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: on 2 cores a multi-threaded ``F.unfold`` costs ~25 ms of overhead per call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
