"""Tokenizer loading (one place, cached per path)."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)


@lru_cache(maxsize=8)
def load_tokenizer(tokenizer_path: str) -> Any:
    """Load the (fast) tokenizer saved in a local folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path)
