"""Pieces of the load benchmark (`make bench`, entry point scripts/bench.py)."""
