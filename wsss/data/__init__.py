"""Datasets, the prepared-data manifest and its validation."""
