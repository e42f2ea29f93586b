"""Seeded, stratified index selection (k-shot subsets, per-class caps, held-out splits).

All helpers work on a 1-D array of integer labels and return sorted index arrays, so the same
seed always gives the same indices whatever order the classes were visited in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

Seed = int | Sequence[int]


def _class_indices(targets: np.ndarray) -> dict[int, np.ndarray]:
    targets = np.asarray(targets)
    return {int(c): np.flatnonzero(targets == c) for c in np.unique(targets)}


def _sorted(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(parts)).astype(np.int64)


def check_shots(shots: int | None) -> int | None:
    """Validate a ``shots`` value (None or an int >= 1)."""
    if shots is None:
        return None
    if isinstance(shots, bool) or not isinstance(shots, int | np.integer):
        raise ValueError(f"shots must be a positive integer or null, got {shots!r}")
    if shots < 1:
        raise ValueError(f"shots must be >= 1 (k images per class), got shots={shots}")
    return int(shots)


def k_shot_indices(
    targets: np.ndarray,
    shots: int,
    seed: Seed,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Exactly ``shots`` indices per class, drawn without replacement.

    Each class is permuted with one generator and its first ``shots`` entries are taken, so for a
    fixed seed the 5-shot subset is contained in the 10-shot one (useful for k-shot curves).
    """
    shots = check_shots(shots)
    assert shots is not None
    by_class = _class_indices(targets)
    classes = range(num_classes) if num_classes is not None else sorted(by_class)
    counts = {c: len(by_class.get(c, ())) for c in classes}
    smallest = min(counts, key=lambda c: counts[c])
    if shots > counts[smallest]:
        label = class_names[smallest] if class_names is not None else str(smallest)
        raise ValueError(
            f"shots={shots} is larger than the smallest class of the training split: "
            f"class {smallest} ({label!r}) has only {counts[smallest]} training images; "
            f"use shots <= {counts[smallest]}"
        )
    rng = np.random.default_rng(seed)
    return _sorted([rng.permutation(by_class[c])[:shots] for c in classes])


def cap_per_class(targets: np.ndarray, max_per_class: int, seed: Seed) -> np.ndarray:
    """At most ``max_per_class`` random indices per class (all of a smaller class)."""
    if max_per_class < 1:
        raise ValueError(f"max images per class must be >= 1, got {max_per_class}")
    rng = np.random.default_rng(seed)
    by_class = _class_indices(targets)
    return _sorted([rng.permutation(by_class[c])[:max_per_class] for c in sorted(by_class)])


def stratified_split(targets: np.ndarray, fraction: float, seed: Seed) -> tuple[np.ndarray, np.ndarray]:
    """Split into (kept, held-out) with ``fraction`` of every class held out.

    Per class, round(fraction * n) images are held out, at least one when ``fraction > 0`` and the
    class has two or more images, and never the last one (so every class stays in the kept part).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for _, idx in sorted(_class_indices(targets).items()):
        n_held = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) >= 2:
            n_held = max(n_held, 1)
        n_held = min(n_held, len(idx) - 1)
        perm = rng.permutation(idx)
        held.append(perm[:n_held])
        kept.append(perm[n_held:])
    return _sorted(kept), _sorted(held)


def per_class_split(
    targets: np.ndarray, n_first: int, n_second: int | None, seed: Seed
) -> tuple[np.ndarray, np.ndarray]:
    """Per class: ``n_first`` random images, then ``n_second`` (None: all the rest) of the others."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c, idx in sorted(_class_indices(targets).items()):
        need = n_first + (n_second if n_second is not None else 1)
        if len(idx) < need:
            raise ValueError(
                f"class {c} has only {len(idx)} images, fewer than the {need} needed "
                f"({n_first} train + {n_second if n_second is not None else 'at least 1'} test)"
            )
        perm = rng.permutation(idx)
        first.append(perm[:n_first])
        second.append(perm[n_first:] if n_second is None else perm[n_first : n_first + n_second])
    return _sorted(first), _sorted(second)


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A random order of ``0..size-1`` that is a function of ``(seed, epoch)`` alone.

    Lightning calls :meth:`set_epoch` before every epoch, so a run resumed from a checkpoint sees exactly the
    batches the uninterrupted run would have seen (a generator seeded once would restart its sequence).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = int(size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
