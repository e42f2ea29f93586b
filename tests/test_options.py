"""Every option-valued config rule accepts exactly what the option's constructor accepts, and names those values."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch import nn

from lqf_exp import head_init, options
from lqf_exp.config import CONFIG_DIR
from lqf_exp.linearize import TANGENT_PATHS, LinearizedNetwork
from lqf_exp.methods import finetune
from lqf_exp.models import activations, pooling
from lqf_exp.precond import factors
from lqf_exp.validation import RULES, Rule

from .helpers.nets import tiny_cnn_net


def _linearized_accepts(value: str) -> bool:
    """Whether LinearizedNetwork takes ``bn_affine=value`` (its tuple is private: ask the constructor)."""
    try:
        LinearizedNetwork(tiny_cnn_net(nn.LeakyReLU), bn_affine=value)
    except ValueError as error:
        assert "bn_affine" in str(error)
        return False
    return True


# rule key -> the constructor's valid values (a tuple), or a test of one value where the module keeps them private
CONSTRUCTORS: dict[str, tuple[str, ...] | Callable[[str], bool]] = {
    "activation.name": activations.ACTIVATIONS,
    "model.pooling": pooling.POOLINGS,
    "method.bn": finetune.BN_MODES,
    "method.head_init": head_init.HEAD_INIT_KINDS,
    "precond.callback.fisher_type": factors.FISHER_TYPES,
    "precond.callback.kfac_approx": factors.KFAC_APPROXES,
    "method.tangent": TANGENT_PATHS,
    "method.bn_affine": _linearized_accepts,
    "task.name": tuple(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml")),
}
OPTION_RULES = {rule.key: rule for rule in RULES if rule.options is not None}


def test_every_option_rule_is_checked_against_its_constructor() -> None:
    assert set(OPTION_RULES) == set(CONSTRUCTORS)


@pytest.mark.parametrize("key", sorted(CONSTRUCTORS))
def test_rule_accepts_what_the_constructor_accepts(key: str) -> None:
    rule: Rule = OPTION_RULES[key]
    assert rule.options is not None
    constructor = CONSTRUCTORS[key]
    if callable(constructor):
        assert all(constructor(v) for v in rule.options)
        assert not constructor("bogus")
    else:
        assert set(rule.options) == set(constructor)
    assert all(rule.valid(v) for v in rule.options)
    assert not rule.valid("bogus") and not rule.valid(None)
    assert rule.expected.startswith("one of " + ", ".join(rule.options))


def test_fine_tuning_and_head_init_share_one_list() -> None:
    assert finetune.HEAD_INITS is head_init.HEAD_INIT_KINDS is options.HEAD_INITS
