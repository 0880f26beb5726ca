"""Float32 vocabulary logits written into the caller's persistent buffer.

The LM head of a bf16 model computes ``[N, vocab]`` in bf16; the sampler wants float32.
``F.linear(x, w).float()`` allocates two fresh full-size tensors every step (16 + 32 MiB
at 32 rows of Gemma 3's 262k vocabulary) whose page faults and frees cost more than the
conversion itself (~13 ms of a ~120 ms decode step on 2 cores). Here the matmul writes
into a persistent staging buffer in the weight dtype and one copy converts it into
``out``: the same values (the matmul rounds each element to bf16 exactly as before), the
same two parallel regions, no allocation. (Converting in cache-sized column chunks
measured no faster and costs two OpenMP parallel regions per chunk, which hurt when
another process shares the cores.)
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F


class _Staging(threading.local):
    """Grow-only staging buffers per (device, dtype); per thread, so two engines in one
    process never share one."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = shape[0] * shape[1]
        buffer = self.buffers.get((device, dtype))
        if buffer is None or buffer.numel() < numel:
            with torch.inference_mode(False):  # a normal tensor: usable in any mode
                buffer = torch.empty(numel, dtype=dtype, device=device)
            self.buffers[(device, dtype)] = buffer
        return buffer[:numel].view(shape)


_STAGING = _Staging()


def linear_logits(
    hidden_states: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 ``hidden_states @ weight.T`` (``[N, V]``), written into ``out`` when given
    (float32 ``[N, V]``, contiguous) and returned."""
    if out is None:
        return F.linear(hidden_states, weight).float()
    if hidden_states.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.mm(hidden_states, weight.t(), out=out)
    if out.device.type != "cpu":
        return out.copy_(F.linear(hidden_states, weight))  # the caching allocator reuses memory
    staging = _STAGING.get(tuple(out.shape), weight.dtype, out.device)
    torch.mm(hidden_states, weight.t(), out=staging)
    return out.copy_(staging)


class LogitsBuffer:
    """A grow-only float32 ``[rows, vocab]`` buffer handed to the LM head each step."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._buffer: torch.Tensor | None = None

    def get(self, num_rows: int) -> torch.Tensor:
        """A ``[num_rows, vocab]`` view; its contents are overwritten by the next ``get``."""
        buffer = self._buffer
        if buffer is None or buffer.shape[0] < num_rows:
            # Rounded up so a batch growing one request at a time does not reallocate
            # every step. A normal tensor (not an inference tensor): usable in any mode.
            rows = -(-num_rows // 8) * 8
            with torch.inference_mode(False):
                buffer = torch.empty(rows, self.vocab_size, dtype=torch.float32, device=self.device)
            self._buffer = buffer
        return buffer[:num_rows]
