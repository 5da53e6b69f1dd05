"""Split tree attention for the engine's verify forward: the prefix through a length-aware fused kernel, the tree
nodes through a small mask, merged by log-sum-exp.

Verifying N tree nodes means N queries against each row's verified prefix (slots `0 .. length - 1` of the slot
cache) plus the tree's own nodes (slots `length .. length + N - 1`), each node seeing only its ancestors. One
explicit `[B, 1, N, S]` mask over the whole slot buffer makes sdpa leave its fused kernels (and repeat the grouped
key/value heads), which at 16k context costs twice a one-token step. Here instead:

- prefix: torch's flash-attention kernel in its variable-length form reads exactly the verified keys of each row
  (`seqused_k`), grouped heads included, in chunks of `PREFIX_CHUNK_SLOTS` slots (split-KV), and returns each
  chunk's log-sum-exp;
- tree: the N nodes' keys are gathered (N x N scores per head, a few kilobytes) and masked by the ancestor matrix;
- merge, exact: `out = sum_p out_p * exp(lse_p - lse)` over the chunks and the tree part, `lse = logsumexp_p lse_p`.

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
    """What the split attention needs about a verify forward, computed once and shared by every layer
    (`TreeAttentionInputs.build`).

    `prefix_lengths` `[B]` int32: slots `0 .. length - 1` of each row hold its verified prefix; `node_slots` `[B, N]`
    long: where each tree node's keys were written; `tree_bias` `[B, 1, 1, N, N]` fp32: 0 where node i sees node j
    (j is i or an ancestor of i), -inf elsewhere; `use_fused_kernel`: the prefix goes through torch's flash kernel,
    over `chunk_size`-slot chunks described by `key_starts` `[B * C + 1]`, `query_starts` `[B * C + 1]` and
    `chunk_used` `[B, C]` (int32; see `_flash_prefix`).
    """

    prefix_lengths: torch.Tensor
    node_slots: torch.Tensor
    tree_bias: torch.Tensor
    use_fused_kernel: bool
    chunk_size: int = 0
    key_starts: torch.Tensor | None = None
    query_starts: torch.Tensor | None = None
    chunk_used: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        prefix_lengths: torch.Tensor,
        node_slots: torch.Tensor,
        visible: torch.Tensor,
        num_slots: int,
        use_fused_kernel: bool,
    ) -> "TreeAttentionInputs":
        """From each row's prefix length `[B]`, the nodes' slots `[B, N]`, their visibility `[B, N, N]` (bool) and
        the slot cache's size."""
        batch, num_nodes = node_slots.shape
        device = node_slots.device
        tree_bias = torch.zeros(visible.shape, device=device).masked_fill(~visible, float("-inf"))[:, None, None]
        inputs = cls(prefix_lengths.to(torch.int32), node_slots, tree_bias, use_fused_kernel)
        if use_fused_kernel:
            chunk = min(PREFIX_CHUNK_SLOTS, num_slots)
            num_chunks = -(-num_slots // chunk)
            sequences = torch.arange(batch * num_chunks + 1, device=device, dtype=torch.int32)
            # Sequence i = (row i // C, chunk i % C) starts at row * S + chunk * size; a row's last one is shorter.
            inputs.key_starts = sequences // num_chunks * num_slots + sequences % num_chunks * chunk
            inputs.query_starts = sequences * num_nodes
            chunk_starts = torch.arange(num_chunks, device=device) * chunk
            inputs.chunk_used = (prefix_lengths[:, None] - chunk_starts[None]).clamp(0, chunk).to(torch.int32)
            inputs.chunk_size = chunk
        return inputs


def fused_prefix_kernel_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether torch's variable-length flash kernel (with per-row key counts) serves these tensors."""
    if device.type != "cuda" or dtype not in _FLASH_DTYPES or head_dim > _FLASH_MAX_HEAD_DIM or head_dim % 8:
        return False
    schema = str(torch.ops.aten._flash_attention_forward.default._schema)
    return "seqused_k" in schema


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
    kernel reads the buffer in place. Each row's slots are cut into chunks of `PREFIX_CHUNK_SLOTS`, each chunk a
    sequence of its own (`seqused_k` = how many of its slots hold the row's prefix) queried by all N nodes: a few
    queries over a long prefix would otherwise give the kernel one block per head, a fraction of the GPU's
    multiprocessors (split-KV, as flash-decoding does).
    """
    batch, num_heads, num_queries, head_dim = query.shape
    num_slots = key.shape[2]
    num_chunks = inputs.chunk_used.shape[1]
    packed_query = query.transpose(1, 2)[:, None].expand(-1, num_chunks, -1, -1, -1).reshape(-1, num_heads, head_dim)
    packed_key = key.transpose(1, 2).reshape(batch * num_slots, key.shape[1], head_dim)  # a view: token-major
    packed_value = value.transpose(1, 2).reshape(batch * num_slots, value.shape[1], head_dim)
    output, lse, *_ = _varlen_flash_forward(
        packed_query,
        packed_key,
        packed_value,
        inputs.query_starts,
        inputs.key_starts,
        num_queries,
        inputs.chunk_size,
        0.0,
        False,
        False,
        scale=scale,
        seqused_k=inputs.chunk_used.flatten(),
    )
    output = output.reshape(batch, num_chunks, num_queries, num_heads, head_dim).transpose(2, 3)
    # The varlen kernel's lse is [Hq, total queries]; a chunk without keys holds no probability mass.
    lse = lse.reshape(num_heads, batch, num_chunks, num_queries).permute(1, 2, 0, 3)  # [B, C, Hq, N]
    return output, lse.masked_fill((inputs.chunk_used == 0)[:, :, None, None], float("-inf"))


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
    if inputs.use_fused_kernel:
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
