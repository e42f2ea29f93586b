"""Features of the frozen prefix of ``method.linearize=<block>``/``head``, computed once per dataset.

Before the first linearized block nothing has a δ and BatchNorm runs on frozen statistics, so the prefix is a fixed
function of the image. The LQF solver passes over the same deterministic datasets again and again (the training set
on every pass, the validation set at every λ of the path), so the prefix's output for each of their samples is
computed once, in dataset order, and later passes run only the linearized blocks
(:meth:`~lqf_exp.linearize.LinearizedNetwork.on_prefix_features`). Samples are addressed by their position in the
dataset, not recognized by content. ``method.prefix_cache_gb`` bounds the memory; past it the prefix is recomputed
every pass, and the log says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["PrefixFeatures"]


@dataclass
class PrefixFeatures:
    """The prefix's output ``features[i]`` and label ``labels[i]`` of sample ``i`` of one dataset."""

    features: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def gigabytes(self) -> float:
        return self.features.numel() * self.features.element_size() / 2**30

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The stored samples in dataset order, ``batch_size`` at a time."""
        for start in range(0, len(self), batch_size):
            yield self.features[start:start + batch_size], self.labels[start:start + batch_size]

    @classmethod
    @torch.no_grad()
    def compute(cls, prefix: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], samples: int, max_gb: float,
                what: str) -> PrefixFeatures | None:
        """Run ``prefix`` over ``batches`` (``samples`` in all, in dataset order) and keep the outputs, on the device
        they were computed on; None, with a log line saying why, when they would exceed ``max_gb``."""
        if not max_gb > 0:
            raise ValueError(f"invalid method.prefix_cache_gb={max_gb!r}: expected a size > 0 in GB, or null")
        features: Tensor | None = None
        labels: Tensor | None = None
        start = 0
        for x, y in batches:
            out = prefix(x)
            if features is None:
                need = samples * out[0].numel() * out.element_size() / 2**30
                if need > max_gb:
                    log.warning(
                        "prefix features of the %s set (%d samples) would take %.2f GB > method.prefix_cache_gb=%.2f: "
                        "every pass recomputes the frozen prefix. Raise the limit to keep them.", what, samples, need,
                        max_gb)
                    return None
                features = out.new_empty((samples, *out.shape[1:]))
                labels = y.new_empty((samples, *y.shape[1:]))
            assert labels is not None
            features[start:start + len(out)] = out
            labels[start:start + len(out)] = y
            start += len(out)
        if features is None or labels is None or start != samples:
            raise ValueError(f"prefix features of the {what} set: the batches gave {start} samples, expected {samples}")
        stored = cls(features, labels)
        log.info("prefix features of the %s set: %d samples, %.3f GB", what, samples, stored.gigabytes)
        return stored
