"""A preallocated key/value cache for block-diffusion decoding (docs/method.md §13.1 items 3a and 3e).

The reference keeps the clean prefix in a ``DynamicCache`` and deep-copies it before every denoising
step, because each forward appends to it. Here every layer owns one buffer ``[B, H_kv, T, D_h]`` for
the whole canvas and each forward writes its keys and values at ``write_at`` and attends over
``[0, write_at + n)``: a denoising step of the block at ``[s, e)`` overwrites the scratch slots
``[s, e)`` (the prefix is never copied), and the final pass over the committed block writes its clean
keys and values into the same slots, where the next block finds them. Keys and values of block ``j``
depend only on blocks ``<= j`` (block-causal attention), so computing them once, when the block is
committed, is exact.

Only ``update`` is called by the Qwen3 attention when the caller passes position ids and a mask
(transformers 5.24 ``Qwen3Attention.forward``); the class duck-types that part of ``transformers.Cache``.
"""

from __future__ import annotations

import torch

__all__ = ["CanvasKVCache"]


class CanvasKVCache:
    """Keys and values of every canvas position, written in place.

    Attributes:
        max_len: T, the canvas length (buffers are allocated lazily, on the first write of each layer,
            with the head count, head size, dtype and device of the keys written).
        write_at: column at which the next forward's keys and values are written.
    """

    def __init__(self, *, max_len: int) -> None:
        if max_len <= 0:
            raise ValueError(f"max_len={max_len} must be > 0")
        self.max_len = max_len
        self.write_at = 0
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write ``[B, H_kv, n, D_h]`` at ``write_at`` and return keys and values of ``[0, write_at + n)``."""
        n = key_states.shape[2]
        end = self.write_at + n
        if end > self.max_len:
            raise ValueError(f"cache write of {n} positions at {self.write_at} exceeds the canvas length {self.max_len}")
        if layer_idx not in self._keys:
            b, h, _, d = key_states.shape
            self._keys[layer_idx] = key_states.new_empty((b, h, self.max_len, d))
            self._values[layer_idx] = value_states.new_empty((b, h, self.max_len, value_states.shape[-1]))
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        keys[:, :, self.write_at:end] = key_states
        values[:, :, self.write_at:end] = value_states
        return keys[:, :, :end], values[:, :, :end]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows where ``keep [B]`` is True (finished sequences leave the batch)."""
        for store in (self._keys, self._values):
            for layer, buffer in store.items():
                store[layer] = buffer[keep]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.write_at

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for t in (*self._keys.values(), *self._values.values()))
