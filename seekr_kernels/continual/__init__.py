"""The SEEKR algorithm: importance, selection, replay, losses, trainer, data, metrics."""
