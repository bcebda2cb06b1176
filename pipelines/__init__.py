"""The pipeline stages: prepare, train-experts, cache, sweep, report (and the `bmoe` CLI)."""
