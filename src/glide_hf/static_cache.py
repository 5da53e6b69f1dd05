"""Slot-addressed caches for the GLIDE engine: every row of a batch keeps its own length.

Transformers' static layers write at one scalar position for the whole batch. Speculative decoding accepts a
different number of tokens per row, so here the engine tells the cache, before each forward, the slot each new
token goes to (`set_write_slots`); the layers scatter the new keys/values there and return their whole buffers,
and the engine's attention masks say which slots each query may see. Nothing is appended or cropped: lengths are
the engine's own state.

- `SlotCache`: one preallocated `[B, H_kv, S, D]` buffer per target layer (prompt + new tokens + tree slots),
  stored token-major (`[B, S, H_kv, D]` underneath) so that a variable-length attention kernel can read each row's
  prefix in place (`tree_attention.py`).
- `DraftRingCache`: the draft's one layer as a ring of `sliding_window + ring_slack` slots (token at position p
  lives in slot p mod R) followed by `tree_slots` scratch slots for the current round's draft tree. Its size does
  not depend on the context length.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["DraftRingCache", "SlotCache", "SlotLayer"]


class SlotLayer(CacheLayerMixin):
    """A preallocated layer written at explicit per-row slots."""

    is_compileable = True
    is_sliding = False

    def __init__(self, key_storage: torch.Tensor, value_storage: torch.Tensor) -> None:
        super().__init__()
        self._set_storage(key_storage, value_storage)
        self.is_initialized = True
        self.write_slots: torch.Tensor | None = None  # [B, Q], set by the owning cache before a forward

    def _set_storage(self, key_storage: torch.Tensor, value_storage: torch.Tensor) -> None:
        """Hold token-major buffers `[B, S, H_kv, D]` and expose them as Transformers' `[B, H_kv, S, D]` views."""
        self.key_storage, self.value_storage = key_storage, value_storage
        self.keys, self.values = key_storage.transpose(1, 2), value_storage.transpose(1, 2)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("SlotLayer buffers are allocated up front.")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        index = self.write_slots[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[-1])
        self.keys.scatter_(2, index, key_states.to(self.keys.dtype))
        self.values.scatter_(2, index, value_states.to(self.values.dtype))
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2], 0

    def get_seq_length(self) -> int:
        # Per-row lengths are the engine's; this is the buffer's size (masks, not lengths, bound what is read).
        return self.keys.shape[-2]

    def get_max_length(self) -> int:
        return self.keys.shape[-2]

    def selected(self, rows: torch.Tensor) -> "SlotLayer":
        """A new layer holding copies of rows `rows` `[B']` (this one is left as it is)."""
        return SlotLayer(self.key_storage[rows], self.value_storage[rows])

    def move_slots(self, source: torch.Tensor, destination: torch.Tensor) -> None:
        """Copy slots `source` `[B, M]` to `destination` `[B, M]` in every row (gather first: they may overlap)."""
        for buffer in (self.keys, self.values):
            gather_index = source[:, None, :, None].expand(-1, buffer.shape[1], -1, buffer.shape[-1])
            moved = buffer.gather(2, gather_index)
            buffer.scatter_(2, destination[:, None, :, None].expand_as(gather_index), moved)


def _zeros_layer(shape: tuple[int, ...], dtype: torch.dtype, device) -> SlotLayer:
    """A slot layer of logical shape `shape` = `[B, H_kv, S, D]`, zero-filled and stored token-major."""
    batch, num_kv_heads, num_slots, head_dim = shape
    storage_shape = (batch, num_slots, num_kv_heads, head_dim)
    return SlotLayer(
        torch.zeros(storage_shape, dtype=dtype, device=device), torch.zeros(storage_shape, dtype=dtype, device=device)
    )


class SlotCache(Cache):
    """Per-row slot-addressed cache for every layer of the target."""

    def __init__(self, layers: list[SlotLayer]) -> None:
        super().__init__(layers=layers)

    @classmethod
    def allocate(
        cls, num_layers: int, batch_size: int, num_kv_heads: int, num_slots: int, head_dim: int, dtype, device
    ) -> "SlotCache":
        shape = (batch_size, num_kv_heads, num_slots, head_dim)
        return cls([_zeros_layer(shape, dtype, device) for _ in range(num_layers)])

    @property
    def num_slots(self) -> int:
        return self.layers[0].keys.shape[-2]

    def set_write_slots(self, slots: torch.Tensor) -> None:
        """Where the next forward's tokens go: `slots` `[B, Q]`."""
        for layer in self.layers:
            layer.write_slots = slots

    def selected(self, rows: torch.Tensor) -> "SlotCache":
        """A new cache holding copies of rows `rows` `[B']`. This one is left as it is: a CUDA graph captured on its
        buffers (which the engine keeps between calls) must find them unchanged."""
        return SlotCache([layer.selected(rows) for layer in self.layers])

    def move_slots(self, source: torch.Tensor, destination: torch.Tensor) -> None:
        for layer in self.layers:
            layer.move_slots(source, destination)


class DraftRingCache(SlotCache):
    """The draft's cache: a ring of recent tokens plus tree scratch slots, with the position held by each slot.

    Slot positions (`slot_positions` `[B, R + T]`, -1 = empty) let the engine build the sliding-window mask without
    caring where in the ring a token sits: softmax does not depend on key order, and keys are rotated at their
    absolute positions before they are stored.
    """

    def __init__(self, layers: list[SlotLayer], ring_size: int, tree_slots: int) -> None:
        super().__init__(layers)
        self.ring_size = ring_size
        self.tree_slots = tree_slots
        batch_size, device = layers[0].keys.shape[0], layers[0].keys.device
        self.slot_positions = torch.full((batch_size, ring_size + tree_slots), -1, dtype=torch.long, device=device)
        # Made once: draft steps build their masks from these instead of launching kernels to remake them.
        self.is_tree_slot = torch.arange(ring_size + tree_slots, device=device) >= ring_size
        self.is_ring_slot = ~self.is_tree_slot

    @classmethod
    def allocate_ring(
        cls, batch_size: int, num_kv_heads: int, ring_size: int, tree_slots: int, head_dim: int, dtype, device
    ) -> "DraftRingCache":
        shape = (batch_size, num_kv_heads, ring_size + tree_slots, head_dim)
        return cls([_zeros_layer(shape, dtype, device)], ring_size, tree_slots)

    def ring_slots(self, positions: torch.Tensor) -> torch.Tensor:
        return positions % self.ring_size

    def tree_slot(self, node_index: torch.Tensor) -> torch.Tensor:
        return self.ring_size + node_index

    def record_positions(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        self.slot_positions.scatter_(1, slots, positions)

    def clear_tree(self, root_positions: torch.Tensor) -> None:
        """Start a round: empty the tree slots, and forget any ring slot beyond the root `root_positions` `[B]`
        (none exists in normal use; a warm-up round before a CUDA graph capture may leave some)."""
        self.slot_positions[:, self.ring_size :] = -1
        ring = self.slot_positions[:, : self.ring_size]
        ring.masked_fill_(ring > root_positions[:, None], -1)

    def reset(self) -> None:
        """Forget every slot (a new call reusing this cache): no slot holds a position."""
        self.slot_positions.fill_(-1)

    def selected(self, rows: torch.Tensor) -> "DraftRingCache":
        cache = DraftRingCache([layer.selected(rows) for layer in self.layers], self.ring_size, self.tree_slots)
        cache.slot_positions = self.slot_positions[rows]
        return cache
