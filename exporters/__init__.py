"""microseg.exporters: Prometheus metrics and the JSON flow log."""
