"""Mixed-precision allocation: per-layer sensitivity probes and the budgeted search."""
