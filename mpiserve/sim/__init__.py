"""`mpiserve simulate` and `mpiserve profile`: the real routers and engine bookkeeping on a
virtual clock, with a cost model (profiled or analytic roofline) in place of the forward pass
and the KV transfer. Imports no torch (only `profile_command` does, when run)."""
