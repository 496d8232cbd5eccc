"""What the server tells its operators: logs, Prometheus metrics, and the per-call facts they label."""
