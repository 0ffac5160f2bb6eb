"""What roomcast shows of itself: Prometheus metrics and structured logs."""
