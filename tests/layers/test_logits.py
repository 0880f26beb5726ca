"""Logits into a persistent buffer: the same values as ``F.linear(...).float()``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.layers.embedding import LMHead
from pagedserve.layers.logits import LogitsBuffer, linear_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 5, 64])
def test_linear_logits_into_buffer_equals_f_linear(dtype: torch.dtype, num_rows: int) -> None:
    torch.manual_seed(0)
    vocab = 10_000
    weight = (torch.randn(vocab, 48) * 0.1).to(dtype)
    hidden = torch.randn(num_rows, 48).to(dtype)
    out = torch.full((num_rows, vocab), float("nan"))
    result = linear_logits(hidden, weight, out)
    assert result.data_ptr() == out.data_ptr() and result.dtype == torch.float32
    assert torch.equal(result, F.linear(hidden, weight).float())


def test_lm_head_softcap_into_buffer() -> None:
    head = LMHead(300, 16, final_logit_softcapping=30.0)
    with torch.no_grad():
        head.weight.copy_(torch.randn(300, 16))
    hidden = torch.randn(3, 16) * 20
    buffer = LogitsBuffer(300, torch.device("cpu"))
    expected = torch.tanh(F.linear(hidden, head.weight) / 30.0) * 30.0
    assert torch.equal(head(hidden), expected)
    assert torch.equal(head(hidden, out=buffer.get(3)), expected)


def test_logits_buffer_grows_and_is_reused() -> None:
    buffer = LogitsBuffer(7, torch.device("cpu"))
    first = buffer.get(3)
    assert first.shape == (3, 7) and first.is_contiguous()
    assert buffer.get(8).data_ptr() == first.data_ptr()  # rounded up to 8 rows at first
    grown = buffer.get(9)
    assert grown.shape == (9, 7) and buffer.get(2).data_ptr() == grown.data_ptr()
    with torch.inference_mode():
        inside = buffer.get(1)
    inside.fill_(1.0)  # a normal tensor: writable outside inference mode too
