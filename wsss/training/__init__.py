"""Training support: checkpoint + resume after a kill, saved models with checked metadata, the epoch loop."""
