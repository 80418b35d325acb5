"""The MPI job: bring-up, control messages, KV transfer and the engine rank loop."""
