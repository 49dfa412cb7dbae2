"""Benchmarks, run by hand from a checkout: ``python -m benchmarks.<script>`` (see README.md)."""
