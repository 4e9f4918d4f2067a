"""Diagnostics of a policy and its gradient, run from the CLI and never by training.

- ``branching``: at which sampling step the reward is decided (``loopdiff branch``);
- ``gradient_noise``: how much of a policy gradient is signal (``loopdiff gradient-noise``).
"""
