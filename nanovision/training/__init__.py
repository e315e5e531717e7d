"""Training utilities for nanovision: sequence packing (`nanovision.training.packing`)."""
