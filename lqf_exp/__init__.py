"""lqf_exp: Linear Quadratic Fine-Tuning (LQF) as a Hydra + Lightning experiment framework."""

__version__ = "0.1.0"
