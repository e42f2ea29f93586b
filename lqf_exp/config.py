"""Config helpers: OmegaConf resolvers used by ``conf/``, and composing the tree from Python."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_resolvers() -> None:
    """Register the resolvers ``conf/`` uses; safe to call more than once."""
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda value, factor: float(value) * float(factor))


register_resolvers()


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The config ``run.py`` would compose for ``overrides``, with Hydra's runtime info set so ``${hydra:...}``
    resolves; ``output_dir`` is where the run writes (for :func:`lqf_exp.pipeline.run` outside the CLI)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.runtime.cwd = str(CONFIG_DIR.parent)
            cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg
