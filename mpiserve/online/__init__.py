"""`mpiserve serve`: rank 0 answers OpenAI-compatible HTTP requests instead of reading a file."""
