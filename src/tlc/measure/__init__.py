"""Cost measurement: parameter and MAC counts, latency, and side-by-side comparisons."""

from tlc.measure.compare import Comparison, compare
from tlc.measure.count import count_macs, count_params
from tlc.measure.latency import LatencyStats, measure_latency, rebatch, time_callable

__all__ = [
    "Comparison",
    "LatencyStats",
    "compare",
    "count_macs",
    "count_params",
    "measure_latency",
    "rebatch",
    "time_callable",
]
