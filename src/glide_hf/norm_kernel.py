"""A Triton RMSNorm: Llama's RMSNorm (normalise in float32, cast to the input dtype, scale by the weight) in one
launch per call instead of five (upcast, square-mean, normalise, cast back, scale).

At batch 1 a decoding step is bound by how many small kernels it launches: the draft layer runs four norms per step,
a Llama-3-8B target 65 per forward. Used inside `GlidePreTrainedModel.fused_for_inference()` for the draft and
`triton_rms_norms(target)` for the target, both of which the engine decodes inside, on CUDA with Triton installed
and without autograd; the CPU tests run the kernel in Triton's interpreter when Triton is installed.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

try:  # optional: without it the norms run as torch ops
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

__all__ = ["LLAMA_RMS_NORM_CLASSES", "rms_norm_kernel_serves", "triton_rms_norm", "triton_rms_norms"]

_MAX_HIDDEN = 65536  # one program holds a whole row

# Transformers' RMSNorms whose forward is exactly Llama's formula, which `triton_rms_norm` computes. Others (Gemma's
# `1 + weight`, norms with a bias or a different cast) are left alone.
LLAMA_RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


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
    # Triton launches on the current device: make it the tensors' (a model on another GPU than the current one).
    with torch.cuda.device(rows.device) if rows.is_cuda else contextlib.nullcontext():
        _rms_norm[(rows.shape[0],)](
            rows, weight, output, rows.stride(0), hidden, eps, BLOCK=block, num_warps=num_warps
        )
    return output.reshape(hidden_states.shape)


@contextlib.contextmanager
def triton_rms_norms(model: nn.Module) -> Iterator[int]:
    """Inside the block, each of `model`'s RMSNorms with Llama's formula (`LLAMA_RMS_NORM_CLASSES`) runs as one Triton
    kernel where `rms_norm_kernel_serves` its input and gradients are disabled, and as itself otherwise. Yields how
    many norms it took over. A norm whose `forward` is already replaced on the instance (an accelerate offloading
    hook, another patch) is left alone; without Triton nothing changes. The engine runs the target inside this block:
    at batch 1 the norms' small kernels are a visible part of a verify forward, and more so with more tree nodes."""
    norms = [] if triton is None else [module for module in model.modules() if _takes_over(module)]
    for norm in norms:
        norm.forward = _triton_or_own_forward(norm, norm.forward)
    try:
        yield len(norms)
    finally:
        for norm in norms:
            del norm.forward  # back to the class's forward


def _takes_over(module: nn.Module) -> bool:
    return (
        type(module).__name__ in LLAMA_RMS_NORM_CLASSES
        and "forward" not in vars(module)
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def _triton_or_own_forward(norm: nn.Module, own_forward):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and rms_norm_kernel_serves(hidden_states):
            return triton_rms_norm(hidden_states, norm.weight, norm.variance_epsilon)
        return own_forward(hidden_states)

    return forward
