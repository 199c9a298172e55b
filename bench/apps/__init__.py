"""Worker apps the benchmarks start with ``celery -A bench.apps.<name>:app worker``."""
