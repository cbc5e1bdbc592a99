"""The model families coconut_fast supports: one list for the model API, the engine and the tiny models."""

LLAMA_FAMILY = ("llama", "qwen2", "qwen3", "mistral")  # RMSNorm, RoPE, grouped-query attention
FAMILIES = ("gpt2", *LLAMA_FAMILY)
