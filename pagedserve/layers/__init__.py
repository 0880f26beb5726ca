"""Model building blocks: fused linear layers, norms, rotary embeddings, attention."""
