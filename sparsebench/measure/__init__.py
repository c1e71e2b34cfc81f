"""Measurement: MACs/FLOPs (attention included), params, latency, realization, environment."""
from sparsebench.measure.flops import MacsReport, count_macs, count_params, unfused_attention
from sparsebench.measure.latency import LatencySettings, compare_latency

__all__ = ["MacsReport", "count_macs", "count_params", "unfused_attention", "LatencySettings", "compare_latency"]
