"""Evaluation: classification metrics and their reports."""
