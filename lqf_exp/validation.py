"""Early, explicit checks of config values, so a bad value fails before any data or weights are loaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lqf_exp.options import (
    ACTIVATIONS,
    BN_AFFINE,
    BN_MODES,
    FISHER_TYPES,
    HEAD_INITS,
    KFAC_APPROXES,
    POOLINGS,
    TANGENT_PATHS,
    TASKS,
)


class ConfigError(ValueError):
    """A config value is out of range; the message names the key, the value and what would be valid."""


@dataclass(frozen=True)
class Rule:
    key: str
    valid: Callable[[Any], bool]
    expected: str
    # The valid values of a string option (the constructor's own tuple, from lqf_exp.options); None for ranges.
    options: tuple[str, ...] | None = None


def one_of(key: str, options: tuple[str, ...], note: str = "") -> Rule:
    """A rule for a string option whose valid values, and the message naming them, come from ``options``."""
    expected = "one of " + ", ".join(options) + (f" ({note})" if note else "")
    return Rule(key, lambda v: isinstance(v, str) and v in options, expected, options)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


RULES: tuple[Rule, ...] = (
    Rule("seed", _is_int, "an integer"),
    Rule("optim.lr", lambda v: _is_number(v) and v > 0, "a number > 0"),
    Rule("optim.weight_decay", lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    Rule("optim.momentum", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    one_of("activation.name", ACTIVATIONS),
    Rule("activation.negative_slope", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    one_of("model.pooling", POOLINGS),
    Rule("model.pooling_reduce_dim", lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
    Rule("model.pooling_iterations", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    Rule("loss.target_scale", lambda v: _is_number(v) and v > 0, "a number > 0"),
    Rule("data.shots", lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
    Rule("data.batch_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    Rule("data.num_workers", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    Rule("data.train_per_class", lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
    Rule("trainer.max_epochs", lambda v: (v is None or _is_int(v)) and (v is None or v >= 1 or v == -1),
         "an integer >= 1, -1 (no limit) or null (with trainer.max_steps)"),
    Rule("trainer.max_steps", lambda v: _is_int(v) and (v >= 1 or v == -1), "an integer >= 1, or -1 (no limit)"),
    Rule("trainer.min_steps", lambda v: v is None or (_is_int(v) and v >= 0), "null or an integer >= 0"),
    Rule("callbacks.early_stopping.patience", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    one_of("method.bn", BN_MODES),
    Rule("method.head_l2", lambda v: v == "auto" or (_is_number(v) and v > 0), "'auto' or a number > 0"),
    Rule("method.l2", lambda v: v == "auto" or (_is_number(v) and v > 0), "'auto' or a number > 0"),
    Rule("precond.callback.damping", lambda v: _is_number(v) and v > 0, "a number > 0"),
    Rule("precond.callback.num_batches", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    Rule("precond.callback.mc_samples", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    Rule("precond.callback.update_every", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    one_of("precond.callback.fisher_type", FISHER_TYPES),
    one_of("precond.callback.kfac_approx", KFAC_APPROXES),
    Rule("precond.callback.eigenvalue_correction", lambda v: isinstance(v, bool), "true or false"),
    Rule("method.weight_decay", lambda v: v == "auto" or (_is_number(v) and v >= 0), "'auto' or a number >= 0"),
    Rule("method.head_init_l2", lambda v: v == "auto" or (_is_number(v) and v >= 0), "'auto' or a number >= 0"),
    Rule("method.linearize", lambda v: isinstance(v, str) and v != "", "'all', 'head' or a block name"),
    one_of("method.head_init", HEAD_INITS,
           "a zero head would make the backbone's Jacobian zero, so only the head would learn"),
    one_of("method.bn_affine", BN_AFFINE),
    one_of("method.tangent", TANGENT_PATHS),
    Rule("method.prefix_cache_gb", lambda v: v is None or (_is_number(v) and v > 0), "null or a number > 0 (GB)"),
    Rule("method.compile", lambda v: isinstance(v, bool), "true or false"),
    Rule("method.jacobian_cache_gb", lambda v: v is None or (_is_number(v) and v > 0), "null or a number > 0 (GB)"),
    one_of("task.name", TASKS),
    Rule("task.steps", lambda v: v is None or (isinstance(v, int) and v >= 1), "an integer >= 1 (task=online)"),
)

_MISSING = object()


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first value outside its valid range; keys absent from ``cfg`` are skipped."""
    for rule in RULES:
        value = OmegaConf.select(cfg, rule.key, default=_MISSING, throw_on_missing=False)
        if value is _MISSING:
            continue
        if not rule.valid(value):
            raise ConfigError(f"invalid config value {rule.key}={value!r}: expected {rule.expected}")
