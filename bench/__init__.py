"""Benchmarks of the RefundSaga on its own embedded stack; see bench/README.md."""
