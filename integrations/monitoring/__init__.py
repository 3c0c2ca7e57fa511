"""Monitoring: Prometheus metrics of batches, GPU and engine, alert rules, Grafana dashboards (see README.md)."""
