"""deploykit: train a small decoder-only LLM and ship it to every runtime."""
