"""A Triton rotary position embedding for the draft step: `x * cos + rotate_half(x) * sin` in one launch instead of
five (two products, a negation, a concatenation, a sum), with torch's roundings (each product, then the sum, rounded
to the output dtype), so the result equals the torch expression.

At batch 1 a draft step is bound by how many small kernels it launches; it rotates twice (the self-attention's
query and key heads together, the cross-attention's query heads). Used only inside
`GlidePreTrainedModel.fused_for_inference()` on CUDA with Triton installed (no autograd); the CPU tests run the
kernel in Triton's interpreter when Triton is installed.
"""

import contextlib

import torch

try:  # optional: without it the rotation runs as torch ops
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

__all__ = ["rotary_kernel_serves", "triton_rotary"]


def rotary_kernel_serves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `triton_rotary` serves these inputs: CUDA, Triton installed, a full-width rotation of a power-of-two
    head size, each tensor contiguous in its last dimension."""
    head_dim = x.shape[-1]
    return (
        triton is not None
        and x.is_cuda
        and cos.shape[-1] == sin.shape[-1] == head_dim
        and head_dim >= 2
        and head_dim & (head_dim - 1) == 0
        and x.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1
    )


if triton is not None:
    # `seq_len` (the tokens a draft step feeds) varies between the steps of a round: not specialized on, so one
    # compiled kernel serves every width, including widths first seen while a CUDA graph is being captured.

    @triton.jit(do_not_specialize=["seq_len"])
    def _rotary(
        x,
        cos,
        sin,
        out,
        seq_len,
        num_heads,
        stride_xb,
        stride_xs,
        stride_xh,
        stride_cb,
        stride_cs,
        stride_sb,
        stride_ss,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        # One program per (batch row, position): every head of that token.
        token = tl.program_id(0)
        batch_row = token // seq_len
        position = token % seq_len
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, HALF)
        valid = (heads < num_heads)[:, None]
        x_base = x + batch_row * stride_xb + position * stride_xs + heads[:, None] * stride_xh + dims[None, :]
        first = tl.load(x_base, mask=valid, other=0.0).to(tl.float32)
        second = tl.load(x_base + HALF, mask=valid, other=0.0).to(tl.float32)
        cos_base = cos + batch_row * stride_cb + position * stride_cs + dims
        sin_base = sin + batch_row * stride_sb + position * stride_ss + dims
        cos_first = tl.load(cos_base).to(tl.float32)[None, :]
        cos_second = tl.load(cos_base + HALF).to(tl.float32)[None, :]
        sin_first = tl.load(sin_base).to(tl.float32)[None, :]
        sin_second = tl.load(sin_base + HALF).to(tl.float32)[None, :]
        dtype = out.dtype.element_ty
        # rotate_half(x) = (-second, first); each product and the sum rounded as torch rounds them.
        out_first = (first * cos_first).to(dtype).to(tl.float32) - (second * sin_first).to(dtype).to(tl.float32)
        out_second = (second * cos_second).to(dtype).to(tl.float32) + (first * sin_second).to(dtype).to(tl.float32)
        out_base = out + (token * num_heads + heads[:, None]) * (2 * HALF) + dims[None, :]
        tl.store(out_base, out_first.to(dtype), mask=valid)
        tl.store(out_base + HALF, out_second.to(dtype), mask=valid)


def triton_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_dim: int = 1) -> torch.Tensor:
    """`modeling_glide.apply_rotary` in one launch: rotate `x` `[B, H, S, D]` (or `[B, S, H, D]` with `heads_dim=2`)
    by `cos`/`sin` `[B, S, D]`. The result has `x`'s shape and the dtype the torch expression promotes to."""
    tokens_first = x.transpose(1, 2) if heads_dim == 1 else x  # [B, S, H, D]
    batch, seq_len, num_heads, head_dim = tokens_first.shape
    if tokens_first.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("triton_rotary needs x, cos and sin contiguous in their last dimension.")
    cos, sin = cos.expand(batch, seq_len, head_dim), sin.expand(batch, seq_len, head_dim)
    dtype = torch.promote_types(x.dtype, cos.dtype)
    out = torch.empty(batch, seq_len, num_heads, head_dim, device=x.device, dtype=dtype)
    # Triton launches on the current device: make it the tensors' (a model on another GPU than the current one).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _rotary[(batch * seq_len,)](
            tokens_first,
            cos,
            sin,
            out,
            seq_len,
            num_heads,
            tokens_first.stride(0),
            tokens_first.stride(1),
            tokens_first.stride(2),
            cos.stride(0),
            cos.stride(1),
            sin.stride(0),
            sin.stride(1),
            HALF=head_dim // 2,
            BLOCK_H=triton.next_power_of_2(num_heads),
        )
    return out.transpose(1, 2) if heads_dim == 1 else out
