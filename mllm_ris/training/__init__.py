"""Training: a minimal accelerate loop for classic mode (the general trainer builds on it)."""
