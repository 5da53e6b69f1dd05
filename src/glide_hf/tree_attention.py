"""Split tree attention for the engine's verify forward: the prefix through a length-aware fused kernel, the tree
nodes through a small mask, merged by log-sum-exp.

Verifying N tree nodes means N queries against each row's verified prefix (slots `0 .. length - 1` of the slot
cache) plus the tree's own nodes (slots `length .. length + N - 1`), each node seeing only its ancestors. One
explicit `[B, 1, N, S]` mask over the whole slot buffer makes sdpa leave its fused kernels (and repeat the grouped
key/value heads), which at 16k context costs twice a one-token step. Here instead:

- prefix: torch's flash-attention kernel in its variable-length form reads exactly the verified keys of each row
  (`seqused_k`) in chunks of slots (split-KV, as flash-decoding does), and returns each chunk's log-sum-exp; the
  query heads that share a key head ride as extra query rows of that head (G x N rows against Hkv heads), so each
  chunk's keys and values are read once, not once per query head;
- tree: the N nodes' keys are gathered (N x N scores per head, a few kilobytes) and masked by the ancestor matrix;
- merge, exact: `out = sum_p out_p * exp(lse_p - lse)` over the chunks and the tree part, `lse = logsumexp_p lse_p`.

Three implementations of that split (`TreeAttentionInputs.kernel`, chosen by `split_attention_kernel`):
- `"triton"` (CUDA, fp16/bf16/fp32, Triton installed): `tree_attention_kernel.py` does prefix, tree and merge of a
  layer in three launches; the torch ops below cost about 0.1 ms per layer in small kernels, more than the attention.
- `"flash"` (CUDA, fp16/bf16): the prefix in torch's flash kernel, the tree and the merge in torch ops.
- `"torch"` (anywhere): the prefix by explicit scores, a masked reference computation: the same split, slower,
  which the CPU tests use to check the merge.

The attention function is registered with Transformers' `AttentionInterface` as `"glide_tree"`; the engine switches
the target to it only around its verify forward and passes the tree through the `glide_tree` keyword, which
Transformers forwards to every attention call. Without that keyword it is plain sdpa.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .errors import GlideConfigError
from .tree_attention_kernel import (
    KernelConfig,
    default_kernel_config,
    prefix_attention_triton,
    tree_attention_triton,
    triton_kernel_serves,
)

__all__ = [
    "SPLIT_KERNELS",
    "TREE_ATTENTION",
    "PrefixChunks",
    "TreeAttentionInputs",
    "fused_prefix_kernel_available",
    "prefix_attention",
    "prefix_attention_serves",
    "prefix_chunk_slots",
    "split_attention_kernel",
    "split_kernel_serves",
    "tree_attention_forward",
    "using_tree_attention",
]

TREE_ATTENTION = "glide_tree"
SPLIT_KERNELS = ("triton", "flash", "torch")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256
# Split-KV sizing of the fused prefix. The kernel runs one block per (chunk, key head, `_FLASH_QUERY_BLOCK` query
# rows); the prefix is cut into as many chunks as give about `PREFIX_BLOCKS_PER_MULTIPROCESSOR` blocks per
# multiprocessor, but none shorter than `PREFIX_MIN_CHUNK_SLOTS` (shorter chunks only add merge work).
PREFIX_BLOCKS_PER_MULTIPROCESSOR = 4
PREFIX_MIN_CHUNK_SLOTS = 256
_FLASH_QUERY_BLOCK = 128
_DEFAULT_MULTIPROCESSORS = 132


@dataclass
class PrefixChunks:
    """How the fused prefix kernel splits each row's slots (see `_flash_prefix`): `chunk_size` slots per chunk,
    sequence i = (row i // C, chunk i % C) with keys from `key_starts[i]` and queries from `query_starts[i]`
    (`[B * C + 1]` int32), `used` `[B, C]` int32 of its slots holding the row's prefix."""

    chunk_size: int
    key_starts: torch.Tensor
    query_starts: torch.Tensor
    used: torch.Tensor


@dataclass
class TreeAttentionInputs:
    """What the split attention needs about a verify forward, computed once and shared by every layer
    (`TreeAttentionInputs.build`).

    `prefix_lengths` `[B]` int32: slots `0 .. length - 1` of each row hold its verified prefix; `node_slots` `[B, N]`
    long: where each tree node's keys were written; `tree_bias` `[B, 1, 1, N, N]` fp32: 0 where node i sees node j
    (j is i or an ancestor of i), -inf elsewhere; `kernel`: one of `SPLIT_KERNELS` (see the module's docstring);
    `num_slots`: the slot cache's size; `chunk_size`: slots per split-KV chunk of the triton or flash prefix (None:
    sized for the GPU by `prefix_chunk_slots`); `triton_config`: the Triton kernel's tiling (None: its default);
    `prefix_chunks`: the flash prefix's chunking, made by the first layer and reused by the others.
    """

    prefix_lengths: torch.Tensor
    node_slots: torch.Tensor
    tree_bias: torch.Tensor
    kernel: str
    num_slots: int
    chunk_size: int | None = None
    triton_config: KernelConfig | None = None
    prefix_chunks: PrefixChunks | None = None

    @classmethod
    def build(
        cls,
        prefix_lengths: torch.Tensor,
        node_slots: torch.Tensor,
        visible: torch.Tensor,
        num_slots: int,
        kernel: str,
        chunk_size: int | None = None,
        triton_config: KernelConfig | None = None,
    ) -> "TreeAttentionInputs":
        """From each row's prefix length `[B]`, the nodes' slots `[B, N]`, their visibility `[B, N, N]` (bool), the
        slot cache's size and the kernel (one of `SPLIT_KERNELS`)."""
        if kernel not in SPLIT_KERNELS:
            raise GlideConfigError(f"`kernel={kernel!r}` is not one of {SPLIT_KERNELS}.")
        tree_bias = torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, float("-inf"))
        lengths = prefix_lengths.to(torch.int32)
        return cls(lengths, node_slots, tree_bias[:, None, None], kernel, num_slots, chunk_size, triton_config)

    def chunk_slots_for(self, num_kv_heads: int, query_rows: int, query_block: int, slot_multiple: int = 1) -> int:
        """Slots per split-KV chunk for `query_rows` query rows per key head, `query_block` rows per kernel block,
        a multiple of `slot_multiple` slots."""
        if self.chunk_size is not None:
            return min(self.chunk_size, self.num_slots)
        batch, device = self.prefix_lengths.shape[0], self.prefix_lengths.device
        chunk = prefix_chunk_slots(self.num_slots, batch, num_kv_heads, query_rows, device, query_block, slot_multiple)
        return min(chunk, self.num_slots)

    def chunks_for(self, num_kv_heads: int, query_rows: int) -> PrefixChunks:
        """The flash prefix's split-KV chunking for `query_rows` query rows per key head (made once per forward)."""
        if self.prefix_chunks is None:
            batch, device = self.prefix_lengths.shape[0], self.prefix_lengths.device
            chunk = self.chunk_slots_for(num_kv_heads, query_rows, _FLASH_QUERY_BLOCK)
            num_chunks = -(-self.num_slots // chunk)
            sequences = torch.arange(batch * num_chunks + 1, device=device, dtype=torch.int32)
            # Sequence i starts at row * S + chunk * size; a row's last chunk may be shorter.
            key_starts = sequences // num_chunks * self.num_slots + sequences % num_chunks * chunk
            chunk_starts = torch.arange(num_chunks, device=device) * chunk
            used = (self.prefix_lengths[:, None] - chunk_starts[None]).clamp(0, chunk).to(torch.int32)
            self.prefix_chunks = PrefixChunks(chunk, key_starts, sequences * query_rows, used)
        return self.prefix_chunks


def prefix_chunk_slots(
    num_slots: int,
    batch: int,
    num_kv_heads: int,
    query_rows: int,
    device: torch.device,
    query_block: int = _FLASH_QUERY_BLOCK,
    slot_multiple: int = 1,
) -> int:
    """Slots per split-KV chunk: enough chunks for about `PREFIX_BLOCKS_PER_MULTIPROCESSOR` kernel blocks per
    multiprocessor (one block per chunk, key head and `query_block` query rows), none shorter than
    `PREFIX_MIN_CHUNK_SLOTS`, a multiple of `slot_multiple` (the Triton kernel's key tile: no chunk ends in a partial
    tile). One query over a long prefix would otherwise give the kernel a block per head, a
    fraction of the GPU; 64 tree nodes over the same prefix need fewer, longer chunks."""
    if device.type == "cuda":
        multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        multiprocessors = _DEFAULT_MULTIPROCESSORS
    blocks_per_chunk = batch * num_kv_heads * -(-query_rows // query_block)
    num_chunks = -(-PREFIX_BLOCKS_PER_MULTIPROCESSOR * multiprocessors // blocks_per_chunk)
    chunk = max(PREFIX_MIN_CHUNK_SLOTS, -(-num_slots // num_chunks))
    return -(-chunk // slot_multiple) * slot_multiple


def prefix_attention_serves(keys: torch.Tensor) -> bool:
    """Whether `prefix_attention` serves these cached keys `[B, Hkv, S, D]` (CUDA, Triton, fp16/bf16/fp32)."""
    return triton_kernel_serves(keys.device, keys.dtype, keys.shape[-1])


def prefix_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """`query` `[B, Hq, Q, D]` attending to the first `lengths[b]` slots of `keys`/`values` `[B, Hkv, S, D]`, every
    query of a row to the same keys (the draft's cross-attention onto the verified target cache), as split-KV chunks
    sized for the GPU: the Triton prefix kernel without a tree part. Returns `[B, Q, Hq, D]`, zeros for a row
    without keys. Where `prefix_attention_serves(keys)`."""
    batch, num_heads, num_queries = query.shape[:3]
    num_kv_heads, num_slots = keys.shape[1], keys.shape[2]
    rows = num_heads // num_kv_heads * num_queries
    config = default_kernel_config(rows, query.dtype)
    chunk = prefix_chunk_slots(num_slots, batch, num_kv_heads, rows, keys.device, config.block_m, config.block_n)
    return prefix_attention_triton(query, keys, values, lengths.to(torch.int32), min(chunk, num_slots), scale, config)


def fused_prefix_kernel_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether torch's variable-length flash kernel (with per-row key counts) serves these tensors."""
    if device.type != "cuda" or dtype not in _FLASH_DTYPES or head_dim > _FLASH_MAX_HEAD_DIM or head_dim % 8:
        return False
    schema = str(torch.ops.aten._flash_attention_forward.default._schema)
    return "seqused_k" in schema


def split_kernel_serves(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `kernel` (one of `SPLIT_KERNELS`) serves a slot cache of this device, dtype and head size."""
    if kernel == "triton":
        return triton_kernel_serves(device, dtype, head_dim)
    if kernel == "flash":
        return fused_prefix_kernel_available(device, dtype, head_dim)
    return True


def split_attention_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The fastest of `SPLIT_KERNELS` that serves a slot cache of this device, dtype and head size."""
    return next(kernel for kernel in SPLIT_KERNELS if split_kernel_serves(kernel, device, dtype, head_dim))


def _varlen_flash_forward(*args, **kwargs):
    """torch's flash-attention kernel in its variable-length form (the one behind `varlen_attn`)."""
    return torch.ops.aten._flash_attention_forward(*args, **kwargs)


def _flash_prefix(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, inputs: TreeAttentionInputs, scale: float
):
    """Attention of `query` `[B, Hq, N, D]` over the first `prefix_lengths[b]` slots of `key`/`value`
    `[B, Hkv, S, D]`, per chunk: outputs `[B, C, Hq, N, D]` and log-sum-exps `[B, C, Hq, N]` (fp32, -inf for a
    chunk without prefix keys), to be merged with `_merge`.

    The slot cache stores keys token-major (`[B, S, Hkv, D]` underneath the `[B, Hkv, S, D]` view), so the varlen
    kernel reads the buffer in place. Each row's slots are cut into chunks (`TreeAttentionInputs.chunks_for`), each
    chunk a sequence of its own (`seqused_k` = how many of its slots hold the row's prefix). The G query heads of
    each key head (head h reads key head h // G) enter as G x N query rows of that key head: the prefix attention
    has no mask, so rows are interchangeable, and each chunk's keys are read once for the whole group.
    """
    batch, num_heads, num_queries, head_dim = query.shape
    num_kv_heads, num_slots = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    rows = groups * num_queries
    chunks = inputs.chunks_for(num_kv_heads, rows)
    num_chunks = chunks.used.shape[1]
    # [B, Hkv, G, N, D] -> rows (g, n) per key head, repeated for every chunk: [B * C * G * N, Hkv, D].
    grouped = query.reshape(batch, num_kv_heads, groups, num_queries, head_dim).permute(0, 2, 3, 1, 4)
    packed_query = grouped.reshape(batch, 1, rows, num_kv_heads, head_dim).expand(-1, num_chunks, -1, -1, -1)
    packed_query = packed_query.reshape(-1, num_kv_heads, head_dim)
    packed_key = key.transpose(1, 2).reshape(batch * num_slots, num_kv_heads, head_dim)  # a view: token-major
    packed_value = value.transpose(1, 2).reshape(batch * num_slots, num_kv_heads, head_dim)
    output, lse, *_ = _varlen_flash_forward(
        packed_query,
        packed_key,
        packed_value,
        chunks.query_starts,
        chunks.key_starts,
        rows,
        chunks.chunk_size,
        0.0,
        False,
        False,
        scale=scale,
        seqused_k=chunks.used.flatten(),
    )
    # [B * C * G * N, Hkv, D] -> [B, C, Hkv, G, N, D] = [B, C, Hq, N, D].
    output = output.reshape(batch, num_chunks, groups, num_queries, num_kv_heads, head_dim).permute(0, 1, 4, 2, 3, 5)
    output = output.reshape(batch, num_chunks, num_heads, num_queries, head_dim)
    # The varlen kernel's lse is [Hkv, total rows]; a chunk without keys holds no probability mass.
    lse = lse.reshape(num_kv_heads, batch, num_chunks, groups, num_queries).permute(1, 2, 0, 3, 4)
    lse = lse.reshape(batch, num_chunks, num_heads, num_queries)
    return output, lse.masked_fill((chunks.used == 0)[:, :, None, None], float("-inf"))


def _reference_prefix(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor, scale: float
):
    """The prefix attention by explicit scores (any device and dtype): output `[B, Hq, N, D]` and log-sum-exp
    `[B, Hq, N]`, fp32."""
    batch, num_heads, num_queries, head_dim = query.shape
    groups = num_heads // key.shape[1]
    grouped = query.reshape(batch, key.shape[1], groups * num_queries, head_dim).float()
    scores = grouped @ key.float().transpose(-1, -2) * scale  # [B, Hkv, G * N, S]
    inside = torch.arange(key.shape[2], device=key.device)[None] < lengths[:, None]  # [B, S]
    scores = scores.masked_fill(~inside[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G * N]
    output = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ value.float()
    return (
        output.reshape(batch, num_heads, num_queries, head_dim),
        lse.reshape(batch, num_heads, num_queries),
    )


def _tree_part(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, inputs: TreeAttentionInputs, scale: float):
    """Attention of the N node queries over the N node keys, each node seeing its ancestors and itself: output
    `[B, Hq, N, D]` and log-sum-exp `[B, Hq, N]`, fp32."""
    batch, num_heads, num_queries, head_dim = query.shape
    num_kv_heads = key.shape[1]
    index = inputs.node_slots[:, None, :, None].expand(-1, num_kv_heads, -1, head_dim)
    node_keys, node_values = key.gather(2, index).float(), value.gather(2, index).float()  # [B, Hkv, N, D]
    grouped = query.reshape(batch, num_kv_heads, num_heads // num_kv_heads, num_queries, head_dim).float()
    scores = torch.matmul(grouped * scale, node_keys[:, :, None].transpose(-1, -2)) + inputs.tree_bias
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, N]; finite: every node sees itself
    output = torch.exp(scores - lse[..., None]) @ node_values[:, :, None]
    return (
        output.reshape(batch, num_heads, num_queries, head_dim),
        lse.reshape(batch, num_heads, num_queries),
    )


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of disjoint key sets from each part's output `[B, P, Hq, N, D]` and log-sum-exp
    `[B, P, Hq, N]`: `out = sum_p out_p * exp(lse_p - lse)`, `lse = logsumexp_p lse_p`. Returns fp32
    `[B, Hq, N, D]` and `[B, Hq, N]`."""
    lses = torch.cat([lse for _, lse in parts], dim=1)
    total = torch.logsumexp(lses, dim=1)
    weights = torch.exp(lses - total[:, None])[..., None]  # a part without keys (-inf) weighs 0
    output, start = None, 0
    for part_output, part_lse in parts:
        count = part_lse.shape[1]
        weighted = (part_output.float() * weights[:, start : start + count]).sum(dim=1)
        output = weighted if output is None else output + weighted
        start += count
    return output, total


def tree_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Transformers attention function: split tree attention when the call carries `glide_tree`, sdpa otherwise.

    Returns `(output [B, N, Hq, D], None)` like every attention function of the interface.
    """
    inputs: TreeAttentionInputs | None = kwargs.pop(TREE_ATTENTION, None)
    if inputs is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if inputs.kernel == "triton":
        num_kv_heads = key.shape[1]
        rows = query.shape[1] // num_kv_heads * query.shape[2]
        config = inputs.triton_config or default_kernel_config(rows, query.dtype)
        chunk = inputs.chunk_slots_for(num_kv_heads, rows, config.block_m, config.block_n)
        output = tree_attention_triton(
            query, key, value, inputs.prefix_lengths, inputs.node_slots, inputs.tree_bias, chunk, scale, config
        )
        return output, None
    if inputs.kernel == "flash":
        prefix = _flash_prefix(query, key, value, inputs, scale)
    else:
        prefix_output, prefix_lse = _reference_prefix(query, key, value, inputs.prefix_lengths, scale)
        prefix = (prefix_output[:, None], prefix_lse[:, None])
    tree_output, tree_lse = _tree_part(query, key, value, inputs, scale)
    output, _ = _merge([prefix, (tree_output[:, None], tree_lse[:, None])])
    return output.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(TREE_ATTENTION, tree_attention_forward)


@contextlib.contextmanager
def using_tree_attention(config) -> Iterator[None]:
    """Route a target's attention through `tree_attention_forward` for the forwards inside the block."""
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = TREE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation_internal = previous
