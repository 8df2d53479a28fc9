"""imgstore benchmark suite: run with `pytest --benchmark-only` from the project root (see README.md here)."""
