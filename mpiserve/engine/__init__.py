"""One engine on one rank: paged KV cache, prefix cache, scheduler, sampler and stop rules
around the model's forward pass. The bookkeeping modules import no torch; `engine` does."""
