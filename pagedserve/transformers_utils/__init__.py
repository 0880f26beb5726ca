"""What pagedserve knows about Hugging Face model files, without any model code (vLLM's
``transformers_utils``): resolving a model name to local files and an HF config, the GGUF
metadata reader, tokenizers and chat templates.

The API process imports this package; it must not import ``pagedserve.models``,
``pagedserve.worker``, ``pagedserve.attention``, ``pagedserve.engine`` or
``pagedserve.entrypoints`` (the engine core process owns the model code).
"""
