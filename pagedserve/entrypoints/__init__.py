"""Entry points: the pagedserve CLI and (later) the OpenAI-compatible server."""
