"""A Triton RMSNorm for the draft step: Llama's RMSNorm (normalise in float32, cast to the input dtype, scale by the
weight) in one launch per call instead of four or more (upcast, normalise, cast back, scale).

At batch 1 a draft step is bound by how many small kernels it launches, and the draft layer runs four norms per
step. Used only inside `GlidePreTrainedModel.fused_for_inference()` on CUDA with Triton installed (no autograd);
the CPU tests run the kernel in Triton's interpreter when Triton is installed.
"""

import torch

try:  # optional: without it the norms run as torch ops
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

__all__ = ["rms_norm_kernel_serves", "triton_rms_norm"]

_MAX_HIDDEN = 65536  # one program holds a whole row


def rms_norm_kernel_serves(hidden_states: torch.Tensor) -> bool:
    """Whether `triton_rms_norm` serves these inputs."""
    return triton is not None and hidden_states.is_cuda and hidden_states.shape[-1] <= _MAX_HIDDEN


if triton is not None:

    @triton.jit
    def _rms_norm(inputs, weight, output, row_stride, num_columns, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        columns = tl.arange(0, BLOCK)
        inside = columns < num_columns
        values = tl.load(inputs + row * row_stride + columns, mask=inside, other=0.0).to(tl.float32)
        variance = tl.sum(values * values, 0) / num_columns
        normed = (values * tl.rsqrt(variance + eps)).to(inputs.dtype.element_ty)  # as Llama: back to the input dtype
        scale = tl.load(weight + columns, mask=inside, other=0.0)
        result = scale.to(tl.float32) * normed.to(tl.float32)
        tl.store(output + row * num_columns + columns, result.to(output.dtype.element_ty), mask=inside)


def triton_rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * rms_norm(hidden_states.float()).to(hidden_states.dtype)` over the last dimension, in the dtype that
    product promotes to."""
    hidden = hidden_states.shape[-1]
    rows = hidden_states.reshape(-1, hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    output = torch.empty(rows.shape, device=rows.device, dtype=torch.promote_types(weight.dtype, hidden_states.dtype))
    block = triton.next_power_of_2(hidden)
    num_warps = min(16, max(1, block // 512))
    _rms_norm[(rows.shape[0],)](rows, weight, output, rows.stride(0), hidden, eps, BLOCK=block, num_warps=num_warps)
    return output.reshape(hidden_states.shape)
