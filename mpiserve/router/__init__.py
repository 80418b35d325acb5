"""Rank 0: engine handles with the three microserving calls, the cluster view routers use,
the built-in routers and the runtime that serves a batch through a router."""
