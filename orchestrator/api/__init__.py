"""HTTP surface: the TCI routes (under ``/`` and ``/v1``), health and metrics."""
