"""loopdiff: reinforcement-learning fine-tuning of text-to-image diffusion models (LOOP, DDPO, RLOO, ...)."""

__version__ = "0.1.0"
