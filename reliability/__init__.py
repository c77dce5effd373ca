"""Reliability tooling: the chaos harness that runs refund sagas under faults and checks them."""
