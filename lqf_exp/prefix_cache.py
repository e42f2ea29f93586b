"""Features of the frozen prefix of ``method.linearize=<block>``, computed once per input and reused.

Before the first linearized block nothing has a δ and BatchNorm runs on frozen statistics, so the prefix is a fixed
function of the input image: its output for an image seen before (the training set on every pass of the solver,
the validation set at every check) is looked up instead of recomputed, and only the linearized blocks run.

Inputs are recognized by content, not by dataset index, so every path that feeds the network (the training loop,
the solver's full passes, validation, K-FAC) shares one cache without knowing about it: each sample's key is its
flattened image projected on four fixed random float64 directions. Two different images get the same key only if
all four projections coincide exactly; a key computed with different rounding (another batch shape) is a miss, not a
wrong hit. With random augmentation every image is new: the cache only grows until its size guard stops it, with a
warning saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["PrefixFeatureCache"]

_PROJECTIONS = 4


class PrefixFeatureCache:
    """Maps an input image to the input of the first linearized child, within ``max_gb`` of memory.

    Args:
        max_gb: size guard of the stored features (on the device they were computed on); when the next batch would
            exceed it, storing stops with one warning and later misses recompute the prefix.
    """

    def __init__(self, max_gb: float) -> None:
        if not max_gb > 0:
            raise ValueError(f"prefix cache size must be > 0 GB, got {max_gb!r}")
        self.max_bytes = int(max_gb * 2**30)
        self.features: dict[bytes, Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0
        self.full = False
        self._directions: Tensor | None = None
        self._layout: tuple | None = None  # (input shape, device, dtype) the cached features belong to

    def clear(self) -> None:
        self.features.clear()
        self.bytes, self.full, self._layout = 0, False, None

    def keys(self, x: Tensor) -> list[bytes]:
        flat = x.detach().flatten(1).to(torch.float64)
        if self._directions is None or self._directions.shape[0] != flat.shape[1] \
                or self._directions.device != flat.device:
            generator = torch.Generator().manual_seed(20210601)
            self._directions = torch.randn(flat.shape[1], _PROJECTIONS, generator=generator,
                                           dtype=torch.float64).to(flat.device)
        return [row.tobytes() for row in (flat @ self._directions).cpu().numpy()]

    def lookup(self, x: Tensor, keys: list[bytes]) -> Tensor | None:
        """The stacked features of every sample of ``x``, or None if any is missing."""
        if self._layout != (tuple(x.shape[1:]), x.device, x.dtype):
            self.clear()
            self._layout = (tuple(x.shape[1:]), x.device, x.dtype)
        rows = [self.features.get(k) for k in keys]
        if any(r is None for r in rows):
            self.misses += 1
            return None
        self.hits += 1
        return torch.stack(rows)  # type: ignore[arg-type]

    def store(self, keys: list[bytes], features: Tensor) -> None:
        if self.full:
            return
        new = [i for i, k in enumerate(keys) if k not in self.features]
        size = len(new) * features[0].numel() * features.element_size()
        if self.bytes + size > self.max_bytes:
            self.full = True
            log.warning(
                "prefix feature cache full: %d samples stored (%.2f GB); more would exceed method.prefix_cache_gb="
                "%.2f GB, so uncached inputs recompute the frozen prefix from now on. Raise the limit, or set "
                "method.prefix_cache_gb=null when the inputs change every pass (random augmentation).",
                len(self.features), self.bytes / 2**30, self.max_bytes / 2**30,
            )
            return
        detached = features.detach()
        for i in new:
            self.features[keys[i]] = detached[i].clone()
        self.bytes += size

    @staticmethod
    @contextmanager
    def capturing(first: nn.Module, sink: list[Tensor]) -> Iterator[None]:
        """Record the input of the first linearized child (the prefix's features) during one forward."""
        handle = first.register_forward_pre_hook(lambda _m, args: sink.append(args[0]))
        try:
            yield
        finally:
            handle.remove()

    @staticmethod
    @contextmanager
    def serving(prefix: list[nn.Module], first: nn.Module, features: Tensor) -> Iterator[None]:
        """Skip the prefix children and hand ``features`` to the first linearized child during one forward."""

        def skip(*_args: object, **_kwargs: object) -> Tensor:
            return features

        for module in prefix:
            module.forward = skip  # type: ignore[method-assign]
        handle = first.register_forward_pre_hook(lambda _m, args: (features, *args[1:]))
        try:
            yield
        finally:
            handle.remove()
            for module in prefix:
                del module.forward
