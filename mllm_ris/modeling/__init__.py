"""Models: classic mode (text encoder + pixel encoder + fusion head) and the losses they share."""
