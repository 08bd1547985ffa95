"""Inference: predictors (one model or an ensemble), loading run directories, metrics, output files."""
