"""Config helpers: OmegaConf resolvers used by ``conf/``, and composing the tree from Python."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_resolvers() -> None:
    """Register the resolvers ``conf/`` uses; safe to call more than once."""
    if not OmegaConf.has_resolver("int_mul"):
        # Milestones as a fraction of the epochs, e.g. ${int_mul:${trainer.max_epochs},0.5}.
        OmegaConf.register_new_resolver("int_mul", lambda value, factor: max(1, int(value * factor)))
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda value, factor: float(value) * float(factor))


register_resolvers()
