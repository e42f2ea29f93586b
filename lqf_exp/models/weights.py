"""Reading and writing network checkpoints, packaged source checkpoints and ImageNet downloads."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from lqf_exp.results import atomic_file

log = logging.getLogger(__name__)

# Module attribute (not a constant baked into functions) so tests can point it at a tmp dir.
PACKAGED_CHECKPOINT_DIR: Path = Path(__file__).resolve().parent.parent / "checkpoints"
HEAD_PREFIX = "fc."
LIGHTNING_PREFIX = "net."
_MAX_KEYS_SHOWN = 5


def packaged_checkpoint_path(arch: str, activation_name: str) -> Path:
    """Path of the shipped source checkpoint for ``arch`` pretrained with ``activation_name``."""
    path = PACKAGED_CHECKPOINT_DIR / f"{arch}_fmnist_source_{activation_name}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"Packaged source checkpoint {path} is missing. Rebuild it (see README "
            f'"Rebuilding the source checkpoints"), pass a file with model.weights=/path/to/file.pth, '
            f"or train from scratch with model.weights=null."
        )
    return path


def download_imagenet_state_dict(weights: WeightsEnum) -> dict[str, Tensor]:
    """Fetch torchvision's ImageNet weights (torch hub cache first); clear error when offline."""
    url = weights.url
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # any network, disk or hash failure means the same thing to the user
        raise RuntimeError(
            f"The ImageNet weights {weights} could not be downloaded from {url} "
            f"(expected in the torch hub cache at {cache}): {exc!r}. Copy the file to that cache path, "
            f"pass a local file with model.weights=/path/to/file.pth, or use model.weights=null "
            f"for random initialisation."
        ) from exc


def _shown(keys: list[str]) -> str:
    more = f" (+{len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else ""
    return ", ".join(keys[:_MAX_KEYS_SHOWN]) + more


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load ``path`` and return ``(state_dict, info)``; ``info`` holds ``arch``/``activation``/``meta``.

    Accepts a plain state dict, our ``{"state_dict", "arch", "activation", "meta"}`` format, and a
    Lightning checkpoint (the ``net.``-prefixed entries of its ``state_dict`` are the network).
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    try:
        # weights_only: never execute pickled code from a file named on the command line.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path} is not a valid state dict (torch.load with weights_only=True failed: {exc})"
        ) from exc
    info: dict[str, Any] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        info = {k: obj.get(k) for k in ("arch", "activation", "meta")}
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        kind = type(obj).__name__
        raise ValueError(f"{path} is not a valid state dict (got {kind}, not a name->tensor map)")
    state = dict(obj)
    if any(str(k).startswith(LIGHTNING_PREFIX) for k in state):
        # A LightningModule keeps the network as self.net; other entries (loss buffers...) are not ours.
        n = len(LIGHTNING_PREFIX)
        state = {k[n:]: v for k, v in state.items() if str(k).startswith(LIGHTNING_PREFIX)}
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path} is not a valid state dict: non-tensor entries {_shown(bad)}")
    return state, info


def recorded_activation(recorded: Any) -> str | None:
    """The activation name a checkpoint records (a name, or an ``{name, ...}`` mapping); ``None`` if it has none."""
    if isinstance(recorded, Mapping):
        recorded = recorded.get("name")
    return None if recorded is None else str(recorded)


def load_network_weights(
    net: nn.Module,
    path: str | os.PathLike[str],
    activation_name: str | None = None,
    fresh_prefixes: Sequence[str] = (),
    head_prefix: str = HEAD_PREFIX,
) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``net`` strictly, except for a head of another size.

    If any ``fc.*`` entry's shape differs from ``net``'s head (new class count, or a pooling with another
    number of features), every ``fc.*`` entry is dropped and the fresh head is kept whole: a pretrained
    bias next to a new weight would be neither. Keys of ``net`` under ``fresh_prefixes`` (layers the
    checkpoint may predate, e.g. ``avgpool.`` of a sqrt_cov pooling) may be missing and then keep their
    init; present, they must match. Any other missing, unexpected or mis-shaped key raises ``ValueError``.
    ``head_prefix``: the head's keys (``"fc."``; ``"head."`` for the ViT, see :mod:`lqf_exp.models.heads`).
    Returns the checkpoint's ``arch``/``activation``/``meta`` info (empty for a plain state dict).
    """
    state, info = read_checkpoint(path)
    target = net.state_dict()
    head = [k for k in state if k.startswith(head_prefix) and k in target]
    dropped = head if any(state[k].shape != target[k].shape for k in head) else []
    for k in dropped:
        del state[k]
    kept_fresh = [k for k in target if k not in state and k.startswith(tuple(fresh_prefixes))]
    missing = [k for k in target if k not in state and k not in dropped and k not in kept_fresh]
    unexpected = [k for k in state if k not in target]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{label}: {_shown(keys)}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if keys
        ]
        hint = f" (checkpoint was saved for arch {info['arch']!r})" if info.get("arch") else ""
        raise ValueError(f"Checkpoint {path} does not match the network{hint}; " + "; ".join(parts))
    net.load_state_dict(state, strict=False)  # strictness already checked above, with better messages
    if dropped:
        log.info("Checkpoint %s: head %s dropped (its size differs), new head kept", path, dropped)
    if kept_fresh:
        log.info("Checkpoint %s has no %s; they keep their (seeded) init", path, _shown(kept_fresh))
    recorded = recorded_activation(info.get("activation"))
    if activation_name is not None and recorded is not None and recorded != activation_name:
        log.warning(
            "Checkpoint %s was trained with activation %r but %r was requested; the activations are "
            "swapped after loading",
            path,
            recorded,
            activation_name,
        )
    return info


def _check_plain(value: Any, where: str) -> None:
    """Refuse metadata that ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint meta key {where}.{k!r} must be str or int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        raise TypeError(
            f"checkpoint meta {where} has type {type(value).__name__}; use plain Python types "
            f"(OmegaConf.to_container for configs) so weights_only loading can read it"
        )


def save_network_checkpoint(
    net: nn.Module, path: str | os.PathLike[str], arch: str, activation_name: str, meta: dict[str, Any]
) -> Path:
    """Write ``{"state_dict", "arch", "activation", "meta"}`` atomically (temp file + ``os.replace``)."""
    _check_plain(dict(meta), "meta")
    path = Path(os.path.expanduser(os.fspath(path)))
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "arch": str(arch),
        "activation": str(activation_name),
        "meta": dict(meta),
    }
    with atomic_file(path, "wb") as handle:  # readers see either the old file or the complete new one
        torch.save(payload, handle)
    return path
