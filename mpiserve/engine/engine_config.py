"""Settings of one engine, validated once and passed to every part that needs them."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidRequestError


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None            # checkpoint directory; None = the built-in demo model
    dtype: str | None = None            # float32 / bfloat16 / float16; None = the checkpoint's
    page_size: int = 16                 # tokens per KV page
    kv_cache_gib: float = 0.5           # memory budget of the KV page pool
    num_pages: int | None = None        # overrides kv_cache_gib when set
    max_num_seqs: int = 64              # running sequences per step
    max_batch_tokens: int = 1024        # tokens computed per step (chunked prefill budget)
    max_model_len: int | None = None    # context length; None = the checkpoint's
    torch_threads: int = 1
    device: str = "auto"                # auto = cuda if available, else cpu
    matmul_dtype: str = "auto"          # dtype of linear layers' products (model/matmul_dtype)

    def __post_init__(self):
        for name in ("page_size", "max_num_seqs", "max_batch_tokens", "torch_threads"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"EngineConfig.{name} must be at least 1")
        if self.kv_cache_gib <= 0:
            raise InvalidRequestError("EngineConfig.kv_cache_gib must be positive")
        if self.num_pages is not None and self.num_pages < 1:
            raise InvalidRequestError("EngineConfig.num_pages must be at least 1")
        if self.matmul_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"EngineConfig.matmul_dtype={self.matmul_dtype!r}: use "
                                      "auto, float32, bfloat16 or float16")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"EngineConfig.dtype={self.dtype!r}: use float32, "
                                      "bfloat16 or float16")
