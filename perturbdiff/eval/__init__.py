"""Evaluation: metrics of predicted populations against real ones."""
