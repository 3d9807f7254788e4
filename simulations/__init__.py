"""Launchers: the only layer that imports Hydra; turns composed configs into settings and runs them."""
