"""Evaluation of a trained posterior model: metrics, calibration and plots."""
