"""The OpenAI-compatible API server (`pagedserve serve`)."""
