"""wsss: weakly-supervised semantic segmentation as an experiment-tracked pipeline."""

__version__ = "0.1.0"
