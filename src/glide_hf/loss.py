"""Training loss of a GLIDE draft: next-token cross-entropy through the target's frozen LM head.

The vocabulary of a target is large (150k for Qwen2), so `[tokens, vocab]` logits dominate training memory. Three
implementations share one signature and one normalisation (that of Transformers' `ForCausalLMLoss`, so gradient
accumulation through `num_items_in_batch` behaves the same):

- `liger`: liger-kernel's fused linear cross-entropy (CUDA, Triton); logits are never stored.
- `chunked`: cross-entropy over chunks of tokens, each chunk's logits recomputed in backward; pure PyTorch.
- `plain`: full logits, then `torch.nn.functional.cross_entropy`; the reference the others are tested against.

An LM head that is not a linear layer with floating-point weights (a quantized or wrapped head) is called as a
module; liger, which needs the weight matrix, then gives way to `chunked`.

This file belongs to the remote-code closure: optional imports sit under `is_*_available()` checks only.
"""

import itertools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.utils import is_liger_kernel_available, logging

from .errors import GlideConfigError

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100


def resolve_loss_implementation(requested: str, device: torch.device) -> str:
    """Map `GlideConfig.loss_implementation` to the implementation that runs on `device`."""
    if requested == "auto":
        return "liger" if device.type == "cuda" and is_liger_kernel_available() else "chunked"
    if requested == "liger":
        if not is_liger_kernel_available():
            raise ImportError(
                '`loss_implementation="liger"` needs liger-kernel: `pip install "glide-hf[liger]"`, or set '
                '`loss_implementation="chunked"`.'
            )
        if device.type != "cuda":
            raise GlideConfigError(
                f'`loss_implementation="liger"` runs on CUDA only, but the hidden states are on `{device}`. '
                'Use `loss_implementation="auto"` or `"chunked"` elsewhere.'
            )
    return requested


def linear_head_weights(lm_head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The weight and bias of an LM head that is a linear layer with floating-point weights, which the fused paths
    read directly; None for any other head (quantized, such as bitsandbytes' or GPTQ's, or wrapped), which is called
    as a module instead."""
    weight = getattr(lm_head, "weight", None)
    if isinstance(lm_head, torch.nn.Linear) and isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight, lm_head.bias
    return None


def head_device(lm_head: torch.nn.Module) -> torch.device | None:
    """Where the LM head's weights are (None for a head without any)."""
    reference = next(itertools.chain(lm_head.parameters(), lm_head.buffers()), None)
    return None if reference is None else reference.device


def head_logits(hidden: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """`lm_head(hidden)`, with `hidden` moved to the head's device (and dtype, for a linear head)."""
    linear = linear_head_weights(lm_head)
    if linear is not None:
        weight, bias = linear
        return F.linear(hidden.to(device=weight.device, dtype=weight.dtype), weight, bias)
    device = head_device(lm_head)
    return lm_head(hidden if device is None else hidden.to(device))


def _sum_cross_entropy(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor):
    logits = head_logits(hidden, lm_head).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _chunked_sum_cross_entropy(hidden, lm_head, labels, chunk_size: int) -> torch.Tensor:
    total = hidden.new_zeros((), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if needs_grad:
            # Recompute this chunk's logits in backward instead of keeping them: memory stays at one chunk.
            total = total + checkpoint(_sum_cross_entropy, h, lm_head, y, use_reentrant=False)
        else:
            total = total + _sum_cross_entropy(h, lm_head, y)
    return total


def _liger_sum_cross_entropy(hidden, weight, bias, labels) -> torch.Tensor:
    if is_liger_kernel_available():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_fn(weight, hidden.to(weight.dtype).contiguous(), labels, bias).float()
    raise ImportError('liger-kernel is not installed: `pip install "glide-hf[liger]"`.')


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor,
    implementation: str = "chunked",
    chunk_size: int = 1024,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Shifted next-token cross-entropy of `lm_head(hidden_states)` against `labels`.

    Args:
        hidden_states (`torch.Tensor` of shape `[batch, seq, hidden]`): the draft's final hidden states.
        lm_head (`torch.nn.Module`): the target's frozen output embedding (a linear layer, or a quantized or wrapped
            head, called as a module).
        labels (`torch.LongTensor` of shape `[batch, seq]`): token ids, `-100` where no loss is wanted. The shift
            is done here: position t predicts `labels[:, t + 1]`.
        implementation (`str`): `"liger"`, `"chunked"` or `"plain"` (see the module docstring).
        chunk_size (`int`): tokens per chunk for `"chunked"`.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): the number of label tokens over all gradient
            accumulation steps (passed by `Trainer`); the loss is the sum divided by it. Without it, the mean over
            this batch's label tokens.

    Returns:
        `torch.Tensor`: a float32 scalar.
    """
    if implementation not in ("liger", "chunked", "plain"):
        raise GlideConfigError(
            f"Unknown loss implementation {implementation!r}: expected 'liger', 'chunked' or 'plain'."
        )
    linear = linear_head_weights(lm_head)
    if implementation == "liger" and linear is None:
        logger.warning_once(
            f"The target's LM head is a `{type(lm_head).__name__}`, not a linear layer with floating-point weights, "
            "which liger's fused cross-entropy needs: the chunked loss computes it through the module instead."
        )
        implementation = "chunked"
    # The LM head may sit on another device than the draft layer when the target is spread over several GPUs.
    device = head_device(lm_head) or hidden_states.device
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1]).to(device)
    targets = labels[:, 1:].reshape(-1).to(device)
    if implementation == "liger":
        total = _liger_sum_cross_entropy(hidden, *linear, targets)
    elif implementation == "chunked":
        total = _chunked_sum_cross_entropy(hidden, lm_head, targets, chunk_size)
    else:
        total = _sum_cross_entropy(hidden, lm_head, targets)
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE_INDEX).sum().clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


__all__ = [
    "IGNORE_INDEX",
    "causal_lm_loss",
    "head_device",
    "head_logits",
    "linear_head_weights",
    "resolve_loss_implementation",
]
