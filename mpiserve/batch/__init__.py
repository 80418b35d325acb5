"""Batch I/O: OpenAI batch-format requests read from JSONL, result and error records written
one per input line."""
