"""The model: configuration, checkpoints (safetensors and GGUF), tokenizers, the demo and
default models, and the transformer's forward pass with its linear-layer weights."""
