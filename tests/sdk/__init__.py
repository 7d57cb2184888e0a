"""Helpers that build one virtualenv per official ``together`` SDK version (they cannot share one)."""
