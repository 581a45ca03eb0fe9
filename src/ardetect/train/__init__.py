"""Training: matcher, losses, engine, phase 1 and phase 2."""
