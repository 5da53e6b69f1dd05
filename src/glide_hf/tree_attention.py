"""Split tree attention for the engine's verify forward: the prefix through a length-aware fused kernel, the tree
nodes through a small mask, merged by log-sum-exp.

Verifying N tree nodes means N queries against each row's verified prefix (slots `0 .. length - 1` of the slot
cache) plus the tree's own nodes (slots `length .. length + N - 1`), each node seeing only its ancestors. One
explicit `[B, 1, N, S]` mask over the whole slot buffer makes sdpa leave its fused kernels (and repeat the grouped
key/value heads), which at 16k context costs twice a one-token step. Here instead:

- prefix: torch's flash-attention kernel in its variable-length form, with `seqused_k` = each row's length, reads
  exactly the verified keys of each row, grouped heads included, and returns its log-sum-exp;
- tree: the N nodes' keys are gathered (N x N scores per head, a few kilobytes) and masked by the ancestor matrix;
- merge: `out = out_prefix * exp(lse_prefix - lse) + out_tree * exp(lse_tree - lse)`, `lse = logaddexp(...)`.

The attention function is registered with Transformers' `AttentionInterface` as `"glide_tree"`; the engine switches
the target to it only around its verify forward and passes the tree through the `glide_tree` keyword, which
Transformers forwards to every attention call. Without that keyword it is plain sdpa. Where the fused kernel does
not serve (CPU, fp32, very large heads) the prefix falls back to a masked reference computation: the same split,
slower, which the CPU tests use to check the merge.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

__all__ = [
    "TREE_ATTENTION",
    "TreeAttentionInputs",
    "fused_prefix_kernel_available",
    "tree_attention_forward",
    "using_tree_attention",
]

TREE_ATTENTION = "glide_tree"
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256
# Slots per chunk of the prefix in the fused kernel: at 16k context a verify forward then runs 16 chunks per head,
# enough blocks to fill an H100/H200; shorter chunks only add merge work.
PREFIX_CHUNK_SLOTS = 1024


@dataclass
class TreeAttentionInputs:
    """What the split attention needs about a verify forward, shared by every layer.

    `prefix_lengths` `[B]` int32: slots `0 .. length - 1` of each row hold its verified prefix;
    `node_slots` `[B, N]` long: where each tree node's keys were written; `visible` `[B, N, N]` bool: node i sees
    node j (j is i or an ancestor of i); `use_fused_kernel`: the prefix goes through torch's flash kernel.
    """

    prefix_lengths: torch.Tensor
    node_slots: torch.Tensor
    visible: torch.Tensor
    use_fused_kernel: bool


def fused_prefix_kernel_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether torch's variable-length flash kernel (with per-row key counts) serves these tensors."""
    if device.type != "cuda" or dtype not in _FLASH_DTYPES or head_dim > _FLASH_MAX_HEAD_DIM or head_dim % 8:
        return False
    schema = str(torch.ops.aten._flash_attention_forward.default._schema)
    return "seqused_k" in schema


def _varlen_flash_forward(*args, **kwargs):
    """torch's flash-attention kernel in its variable-length form (the one behind `varlen_attn`)."""
    return torch.ops.aten._flash_attention_forward(*args, **kwargs)


def _flash_prefix(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor, scale: float):
    """Attention of `query` `[B, Hq, N, D]` over the first `lengths[b]` slots of `key`/`value` `[B, Hkv, S, D]`.

    The slot cache stores keys token-major (`[B, S, Hkv, D]` underneath the `[B, Hkv, S, D]` view), so the varlen
    kernel reads the buffer in place. Each row's slots are cut into chunks of `PREFIX_CHUNK_SLOTS`, each chunk a
    sequence of its own (`seqused_k` = how many of its slots hold the row's prefix) queried by all N nodes: a few
    queries over a long prefix would otherwise give the kernel one block per head, a fraction of the GPU's
    multiprocessors (split-KV, as flash-decoding does). The chunks' results are merged by their log-sum-exp.
    Returns the output `[B, Hq, N, D]` and the log-sum-exp `[B, Hq, N]`, both fp32.
    """
    batch, num_heads, num_queries, head_dim = query.shape
    num_slots = key.shape[2]
    chunk = min(PREFIX_CHUNK_SLOTS, num_slots)
    num_chunks = -(-num_slots // chunk)
    sequences = torch.arange(batch * num_chunks + 1, device=query.device, dtype=torch.int32)
    # Sequence i = (row i // C, chunk i % C) starts at row * S + chunk * size; the last one of a row is shorter.
    key_starts = sequences // num_chunks * num_slots + sequences % num_chunks * chunk
    chunk_starts = torch.arange(num_chunks, device=query.device) * chunk
    used = (lengths[:, None] - chunk_starts[None]).clamp(0, chunk).to(torch.int32)  # [B, C]
    packed_query = (
        query.transpose(1, 2)[:, None].expand(-1, num_chunks, -1, -1, -1).reshape(-1, num_heads, head_dim)
    )
    packed_key = key.transpose(1, 2).reshape(batch * num_slots, key.shape[1], head_dim)  # a view: token-major
    packed_value = value.transpose(1, 2).reshape(batch * num_slots, value.shape[1], head_dim)
    output, lse, *_ = _varlen_flash_forward(
        packed_query, packed_key, packed_value, sequences * num_queries, key_starts, num_queries, chunk,
        0.0, False, False, scale=scale, seqused_k=used.flatten(),
    )
    output = output.reshape(batch, num_chunks, num_queries, num_heads, head_dim).permute(0, 1, 3, 2, 4)
    # The varlen kernel's lse is [Hq, total queries]; a chunk without keys holds no probability mass.
    lse = lse.reshape(num_heads, batch, num_chunks, num_queries).permute(1, 2, 0, 3).float()  # [B, C, Hq, N]
    lse = lse.masked_fill((used == 0)[:, :, None, None], float("-inf"))
    total = torch.logsumexp(lse, dim=1)  # finite: chunk 0 holds each row's first token
    weights = torch.exp(lse - total[:, None])[..., None]
    return (output.float() * weights).sum(dim=1), total


def _reference_prefix(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor,
                      scale: float):
    """The same as `_flash_prefix` by explicit scores (any device and dtype)."""
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


def _tree_part(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, inputs: TreeAttentionInputs,
               scale: float):
    """Attention of the N node queries over the N node keys, each node seeing its ancestors and itself."""
    batch, num_heads, num_queries, head_dim = query.shape
    num_kv_heads = key.shape[1]
    index = inputs.node_slots[:, None, :, None].expand(-1, num_kv_heads, -1, head_dim)
    node_keys, node_values = key.gather(2, index).float(), value.gather(2, index).float()  # [B, Hkv, N, D]
    grouped = query.reshape(batch, num_kv_heads, num_heads // num_kv_heads, num_queries, head_dim).float()
    scores = grouped @ node_keys[:, :, None].transpose(-1, -2) * scale  # [B, Hkv, G, N, N]
    scores = scores.masked_fill(~inputs.visible[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    output = torch.softmax(scores, dim=-1) @ node_values[:, :, None]
    return (
        output.reshape(batch, num_heads, num_queries, head_dim),
        lse.reshape(batch, num_heads, num_queries),
    )


def tree_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Transformers attention function: split tree attention when the call carries `glide_tree`, sdpa otherwise.

    Returns `(output [B, N, Hq, D], None)` like every attention function of the interface.
    """
    inputs: TreeAttentionInputs | None = kwargs.pop(TREE_ATTENTION, None)
    if inputs is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    prefix = _flash_prefix if inputs.use_fused_kernel else _reference_prefix
    prefix_output, prefix_lse = prefix(query, key, value, inputs.prefix_lengths, scale)
    tree_output, tree_lse = _tree_part(query, key, value, inputs, scale)
    lse = torch.logaddexp(prefix_lse, tree_lse)  # the tree part always holds the node itself: finite
    output = prefix_output.float() * torch.exp(prefix_lse - lse)[..., None] + tree_output * torch.exp(
        tree_lse - lse
    )[..., None]
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
