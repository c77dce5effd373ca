"""Reliability tooling: the chaos harness that runs refund sagas under faults and checks them.

`chaos` is the entry point; `invariants` the pure checks, fed by `collect` with `records`.
"""
