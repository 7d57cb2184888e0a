"""The runner agent that lives inside every sandbox container."""

__version__ = "0.1.0"
