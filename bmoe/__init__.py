"""Biased Mixtures of Experts: the method, framework-light (torch, numpy, scipy)."""

from bmoe.bias import bias_loss, select_bias, select_bias_for_performance
from bmoe.curves import rho
from bmoe.gating import count_macs
from bmoe.routing import enforce_bias, oracle_assignment, random_assignment, sparse_gates, utility

__all__ = [
    "sparse_gates",
    "utility",
    "enforce_bias",
    "random_assignment",
    "oracle_assignment",
    "select_bias",
    "select_bias_for_performance",
    "bias_loss",
    "rho",
    "count_macs",
]
