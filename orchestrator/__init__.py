"""A self-hosted, drop-in Together Code Interpreter: one hardened container per session."""

__version__ = "0.1.0"
