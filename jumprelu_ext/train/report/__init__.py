"""Evaluation and reporting: metrics, the downstream splice test, plots and the run log."""
