"""Method registry. Built-in methods register on import; third-party packages register
through the `sparsebench.methods` entry-point group and land in the same registry."""
from sparsebench.methods.base import (
    METHODS, NO_MECHANISM, Method, MethodContext, Outcome, build_config, config_dict, create_method, judge_mechanism,
    register_method,
)
from sparsebench.methods import baselines, dst, gap, ofb, pass_, svite  # noqa: F401  (register built-in methods)

__all__ = ["METHODS", "NO_MECHANISM", "Method", "MethodContext", "Outcome", "build_config", "config_dict",
           "create_method", "judge_mechanism", "register_method"]
