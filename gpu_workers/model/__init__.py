"""The Llama-family decoder (Llama, Mistral, Qwen2) on a paged KV cache, and what loads it."""
