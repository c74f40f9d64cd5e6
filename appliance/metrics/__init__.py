"""Prometheus metrics of the running proxy (``[metrics] listen``): see :mod:`appliance.metrics.exporter`."""

from appliance.metrics.exporter import Metrics, serve_metrics

__all__ = ["Metrics", "serve_metrics"]
