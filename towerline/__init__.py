"""Towerline: dense retrieval and recommendation platform (shared core)."""

__version__ = "0.1.0"
