"""Training methods as LightningModules; ``conf/method/<name>.yaml`` names one of these classes."""

from lqf_exp.curvature import CurvatureTargets
from lqf_exp.methods.base import ClassifierModule
from lqf_exp.methods.finetune import FineTune
from lqf_exp.methods.lqf import LQF
from lqf_exp.methods.probe import Probe, head_of

__all__ = ["ClassifierModule", "CurvatureTargets", "FineTune", "LQF", "Probe", "head_of"]
