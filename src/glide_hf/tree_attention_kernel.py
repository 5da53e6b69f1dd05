"""Triton kernels for the engine's split tree attention: the whole verify attention of one layer (prefix, tree and
merge) in three launches.

`tree_attention.py` describes the split: N tree-node queries attend to each row's verified prefix (slots
`0 .. length - 1`) and, through the ancestor mask, to the tree's own nodes. Done with torch ops that is some 25 small
kernels per layer (query packing, a flash call, the tree's scores, the log-sum-exp merge), about 0.1 ms per layer on
an H200 whatever the context: more than the attention itself. Here, three launches:

1. `_partial_attention`, launched twice: one program per (part, row and key head, block of query rows). Parts
   `0 .. C - 1` are split-KV chunks of the prefix, part `C` is the tree (node keys gathered from their slots,
   masked by the tree bias). The G query heads of a key head ride as G x N query rows, so each key tile is read
   once per group. Each program writes its rows' normalised output and base-2 log-sum-exp (fp32).
2. `_merge_parts`: one program per (row and key head, query row) combines the C + 1 parts exactly
   (`out = sum_p out_p * 2^(lse_p - lse)`, parts without keys weigh 0) and writes the `[B, N, Hq, D]` output the
   attention interface returns. With few query rows (a token, a short chain: many parts, few programs) it reads a
   row's parts as one tile, otherwise part by part.

`prefix_attention_triton` runs the prefix parts and the merge only: the draft's cross-attention onto each row's
verified prefix of the target cache (`tree_attention.prefix_attention`).

Used where Triton is installed and the slot cache is on CUDA in fp16, bf16 or fp32 (fp32 without TF32, so a fp32
engine stays exactly the target; `tree_attention.split_attention_kernel`); the CPU tests run the same kernels in
Triton's interpreter (`TRITON_INTERPRET=1`) when Triton is installed.
"""

import contextlib
from dataclasses import dataclass

import torch

try:  # optional: the engine falls back to torch's flash kernel or plain torch without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

__all__ = [
    "TRITON_DTYPES",
    "KernelConfig",
    "default_kernel_config",
    "prefix_attention_triton",
    "tree_attention_triton",
    "triton_kernel_serves",
]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Tiles of up to 64 x 128 query rows and 64-128 keys with 3 pipeline stages fit a Hopper's shared memory at this head
# size (measured: 128, the size of every supported target family); larger heads take the flash prefix.
_MAX_HEAD_DIM = 128
_MIN_QUERY_BLOCK = 16  # tl.dot's smallest tile


@dataclass(frozen=True)
class KernelConfig:
    """Tiling of the partial kernel: `block_m` query rows and `block_n` keys per tile, Triton's `num_warps` and
    `num_stages` (software pipelining of the key/value loads)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Tilings picked by `python benchmarks/probe_verify_kernels.py --sweep` on an H200 for 16-bit inputs
# (docs/benchmarks.md, runs 9 and 10): few query rows are memory-bound and want long key tiles; many rows want
# 64 x 64 tiles, deeper pipelined. fp32 tiles take twice the shared memory: there the tiling of run 8 (64 keys,
# 2 stages), which ran the 32k-token fp32 exactness check.
_FEW_ROWS_CONFIG = KernelConfig(block_m=_MIN_QUERY_BLOCK, block_n=128, num_warps=4, num_stages=2)
_MANY_ROWS_CONFIG = KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
_FEW_ROWS = 32


def default_kernel_config(query_rows: int, dtype: torch.dtype = torch.bfloat16) -> KernelConfig:
    """The tiling for `query_rows` query rows per key head (G x N) of this dtype: for 16-bit inputs
    `_FEW_ROWS_CONFIG` up to `_FEW_ROWS` rows (a token or a short chain), `_MANY_ROWS_CONFIG` beyond (trees); for
    fp32 a power-of-two block of 16 to 64 rows against 64 keys, 2 stages."""
    if dtype == torch.float32:
        block_m = min(64, max(_MIN_QUERY_BLOCK, triton.next_power_of_2(query_rows)))
        return KernelConfig(block_m=block_m, block_n=64, num_warps=4, num_stages=2)
    return _FEW_ROWS_CONFIG if query_rows <= _FEW_ROWS else _MANY_ROWS_CONFIG


def triton_kernel_serves(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether these kernels serve a slot cache of this device, dtype and head size."""
    return triton is not None and device.type == "cuda" and dtype in TRITON_DTYPES and head_dim <= _MAX_HEAD_DIM


if triton is not None:

    @triton.jit
    def _partial_attention(
        query,
        key,
        value,
        prefix_lengths,
        node_slots,
        tree_bias,
        part_output,
        part_lse,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_vb,
        stride_vh,
        stride_vs,
        stride_nb,
        stride_nn,
        stride_tb,
        stride_ti,
        stride_tj,
        num_nodes,
        groups,
        num_kv_heads,
        num_prefix_parts,
        num_parts,
        chunk_size,
        num_tiles,
        scale_log2,
        TREE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # Row blocks vary fastest, so the programs reading one chunk's keys run together (the keys stay in L2).
        row_block = tl.program_id(0)
        part = num_prefix_parts if TREE else tl.program_id(1)
        row_head = tl.program_id(2)
        batch_row = row_head // num_kv_heads
        kv_head = row_head % num_kv_heads
        query_rows = groups * num_nodes
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query row r = g * N + n
        row_valid = rows < query_rows
        group = rows // num_nodes
        node = rows % num_nodes
        dims = tl.arange(0, BLOCK_D)
        dim_valid = dims < HEAD_DIM
        head = kv_head * groups + group
        q = tl.load(
            query + batch_row * stride_qb + head[:, None] * stride_qh + node[:, None] * stride_qn + dims[None, :],
            mask=row_valid[:, None] & dim_valid[None, :],
            other=0.0,
        )
        key_base = key + batch_row * stride_kb + kv_head * stride_kh
        value_base = value + batch_row * stride_vb + kv_head * stride_vh
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # A prefix part reads slots [start, end) of its chunk; the tree part reads the N nodes through `node_slots`.
        # Only the tiles that hold keys run: the cache has room for the tokens still to come (and rows of a batch
        # differ in length), so a row's last chunks are often partly or wholly past its length.
        if TREE:
            start = 0
            end = num_nodes
        else:
            start = part * chunk_size
            end = tl.minimum(start + chunk_size, tl.load(prefix_lengths + batch_row))
        live_tiles = tl.minimum(num_tiles, tl.maximum(tl.cdiv(end - start, BLOCK_N), 0))
        # Prefix tiles wholly inside [start, end) (all but a row's last) need no key mask, and take the scale in
        # one multiply-add with the running maximum (`raw * scale - max`); the others, and the tree, are masked.
        full_tiles = 0 if TREE else tl.minimum(live_tiles, tl.maximum((end - start) // BLOCK_N, 0))
        for tile in range(0, full_tiles):
            offsets = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
            k = tl.load(key_base + offsets[None, :] * stride_ks + dims[:, None], mask=dim_valid[:, None], other=0.0)
            raw = tl.dot(q, k, input_precision=DOT_PRECISION)
            new_max = tl.maximum(row_max, tl.max(raw, 1) * scale_log2)  # finite: every key counts
            probs = tl.exp2(raw * scale_log2 - new_max[:, None])
            rescale = tl.exp2(row_max - new_max)
            row_sum = row_sum * rescale + tl.sum(probs, 1)
            v = tl.load(value_base + offsets[:, None] * stride_vs + dims[None, :], mask=dim_valid[None, :], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
            row_max = new_max
        for tile in range(full_tiles, live_tiles):
            offsets = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
            key_valid = offsets < end
            if TREE:
                slots = tl.load(node_slots + batch_row * stride_nb + offsets * stride_nn, mask=key_valid, other=0)
            else:
                slots = offsets
            k = tl.load(
                key_base + slots[None, :] * stride_ks + dims[:, None],
                mask=key_valid[None, :] & dim_valid[:, None],
                other=0.0,
            )
            scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
            if TREE:
                bias = tl.load(
                    tree_bias + batch_row * stride_tb + node[:, None] * stride_ti + offsets[None, :] * stride_tj,
                    mask=row_valid[:, None] & key_valid[None, :],
                    other=0.0,
                )
                scores = scores + bias
            scores = tl.where(key_valid[None, :], scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            probs = tl.exp2(scores - safe_max[:, None])
            rescale = tl.exp2(row_max - safe_max)
            row_sum = row_sum * rescale + tl.sum(probs, 1)
            v = tl.load(
                value_base + slots[:, None] * stride_vs + dims[None, :],
                mask=key_valid[:, None] & dim_valid[None, :],
                other=0.0,
            )
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
            row_max = new_max
        has_keys = row_sum > 0.0
        output = acc / tl.where(has_keys, row_sum, 1.0)[:, None]
        lse = tl.where(has_keys, row_max + tl.log2(tl.where(has_keys, row_sum, 1.0)), float("-inf"))
        base = (row_head * num_parts + part) * query_rows + rows
        tl.store(part_lse + base, lse, mask=row_valid)
        tl.store(
            part_output + base[:, None] * HEAD_DIM + dims[None, :],
            output,
            mask=row_valid[:, None] & dim_valid[None, :],
        )

    @triton.jit
    def _merge_parts(
        part_output,
        part_lse,
        output,
        stride_ob,
        stride_on,
        stride_oh,
        num_nodes,
        groups,
        num_kv_heads,
        num_parts,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr,
        PARTS_AS_TILE: tl.constexpr,
    ):
        row_head = tl.program_id(0)
        row = tl.program_id(1)
        query_rows = groups * num_nodes
        parts = tl.arange(0, BLOCK_P)
        part_valid = parts < num_parts
        lse = tl.load(part_lse + (row_head * num_parts + parts) * query_rows + row, mask=part_valid, other=-1e30)
        lse = tl.where(lse == float("-inf"), -1e30, lse)  # parts without keys
        top = tl.max(lse, 0)
        weights = tl.exp2(lse - top)
        total = tl.sum(weights, 0)
        dims = tl.arange(0, BLOCK_D)
        dim_valid = dims < HEAD_DIM
        if PARTS_AS_TILE:
            # Few query rows, many parts: read the row's parts as one [parts, head dim] tile, all loads in flight
            # at once (a loop waits for each load in turn, and too few programs run to hide that).
            index = (row_head * num_parts + parts) * query_rows + row
            outputs = tl.load(
                part_output + index[:, None] * HEAD_DIM + dims[None, :],
                mask=part_valid[:, None] & dim_valid[None, :],
                other=0.0,
            )
            merged = tl.sum(weights[:, None] * outputs, 0) / total
        else:
            # Many query rows, few parts: enough programs run to hide each load's latency.
            merged = tl.zeros([BLOCK_D], dtype=tl.float32)
            for part in range(0, num_parts):
                index = (row_head * num_parts + part) * query_rows + row
                weight = tl.exp2(tl.maximum(tl.load(part_lse + index), -1e30) - top) / total
                merged += weight * tl.load(part_output + index * HEAD_DIM + dims, mask=dim_valid, other=0.0)
        batch_row = row_head // num_kv_heads
        head = (row_head % num_kv_heads) * groups + row // num_nodes
        node = row % num_nodes
        target = output + batch_row * stride_ob + node * stride_on + head * stride_oh + dims
        tl.store(target, merged.to(output.dtype.element_ty), mask=dim_valid)


def tree_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix_lengths: torch.Tensor,
    node_slots: torch.Tensor,
    tree_bias: torch.Tensor,
    chunk_size: int,
    scale: float,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Split tree attention of one layer: `query` `[B, Hq, N, D]` over the first `prefix_lengths[b]` slots of
    `key`/`value` `[B, Hkv, S, D]` plus the N nodes at `node_slots` `[B, N]` as `tree_bias` `[B, 1, 1, N, N]`
    (0 / -inf) allows, the prefix in `chunk_size`-slot parts, tiled by `config` (default: `default_kernel_config`).
    Returns `[B, N, Hq, D]` in the query's dtype.

    The last dimension of every tensor must be contiguous (the slot cache's views are).
    """
    batch, num_nodes = query.shape[0], query.shape[2]
    bias = tree_bias.reshape(batch, num_nodes, num_nodes)
    return _split_attention(query, key, value, prefix_lengths, (node_slots, bias), chunk_size, scale, config)


def prefix_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix_lengths: torch.Tensor,
    chunk_size: int,
    scale: float,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """`query` `[B, Hq, Q, D]` over the first `prefix_lengths[b]` slots of `key`/`value` `[B, Hkv, S, D]` only
    (every query of a row sees the same keys: the draft's cross-attention onto the verified target cache), in
    `chunk_size`-slot parts. Returns `[B, Q, Hq, D]` in the query's dtype; zeros for a row without keys."""
    return _split_attention(query, key, value, prefix_lengths, None, chunk_size, scale, config)


def _split_attention(query, key, value, prefix_lengths, tree, chunk_size: int, scale: float, config) -> torch.Tensor:
    """The prefix parts, the tree part where `tree` = (node slots `[B, N]`, bias `[B, N, N]`) is given, and the
    merge."""
    batch, num_heads, num_nodes, head_dim = query.shape
    num_kv_heads, num_slots = key.shape[1], key.shape[2]
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("The Triton split attention needs query, key and value contiguous in their last dimension.")
    groups = num_heads // num_kv_heads
    query_rows = groups * num_nodes
    num_prefix_parts = -(-num_slots // chunk_size)
    num_parts = num_prefix_parts + (tree is not None)
    part_output = torch.empty(batch * num_kv_heads * num_parts * query_rows, head_dim, device=query.device)
    part_lse = torch.empty(batch * num_kv_heads * num_parts * query_rows, device=query.device)
    config = config or default_kernel_config(query_rows, query.dtype)
    block_d = triton.next_power_of_2(head_dim)
    # Without a tree the kernel never reads the node slots and bias: any int tensor stands in.
    node_slots, bias = tree if tree is not None else (prefix_lengths[:, None], prefix_lengths[:, None, None])
    arguments = (
        query,
        key,
        value,
        prefix_lengths,
        node_slots,
        bias,
        part_output,
        part_lse,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        key.stride(0),
        key.stride(1),
        key.stride(2),
        value.stride(0),
        value.stride(1),
        value.stride(2),
        node_slots.stride(0),
        node_slots.stride(1),
        bias.stride(0),
        bias.stride(1),
        bias.stride(2),
        num_nodes,
        groups,
        num_kv_heads,
        num_prefix_parts,
        num_parts,
        chunk_size,
    )
    row_blocks = triton.cdiv(query_rows, config.block_m)
    scale_log2 = scale * 1.4426950408889634  # log2(e): the kernels work in base 2
    # fp32 stays exact (no TF32), as torch's matmuls by default.
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    blocks = dict(
        DOT_PRECISION=precision,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    # Triton launches on the current device: make it the tensors' (a model on another GPU than the current one).
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        prefix_tiles = triton.cdiv(chunk_size, config.block_n)
        _partial_attention[(row_blocks, num_prefix_parts, batch * num_kv_heads)](
            *arguments, prefix_tiles, scale_log2, TREE=False, **blocks
        )
        if tree is not None:
            tree_tiles = triton.cdiv(num_nodes, config.block_n)
            _partial_attention[(row_blocks, 1, batch * num_kv_heads)](
                *arguments, tree_tiles, scale_log2, TREE=True, **blocks
            )
        output = torch.empty(batch, num_nodes, num_heads, head_dim, device=query.device, dtype=query.dtype)
        _merge_parts[(batch * num_kv_heads, query_rows)](
            part_output,
            part_lse,
            output,
            output.stride(0),
            output.stride(1),
            output.stride(2),
            num_nodes,
            groups,
            num_kv_heads,
            num_parts,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_P=triton.next_power_of_2(num_parts),
            PARTS_AS_TILE=query_rows <= _FEW_ROWS,  # measured on an H200 (docs/benchmarks.md, runs 11 and 12)
        )
    return output
