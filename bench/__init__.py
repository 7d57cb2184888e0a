"""Benchmarks of the orchestrator against its floors and a peer (``python -m bench``; not a test suite)."""
