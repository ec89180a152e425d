"""Calibration: preprocessing (shared with the runner), the built-in data sets, observer statistics."""
