"""Training loss of a GLIDE draft: next-token cross-entropy through the target's frozen LM head.

The vocabulary of a target is large (150k for Qwen2), so `[tokens, vocab]` logits dominate training memory. Three
implementations share one signature and one normalisation (that of Transformers' `ForCausalLMLoss`, so gradient
accumulation through `num_items_in_batch` behaves the same):

- `liger`: liger-kernel's fused linear cross-entropy (CUDA, Triton); logits are never stored.
- `chunked`: cross-entropy over chunks of tokens, each chunk's logits recomputed in backward; pure PyTorch.
- `plain`: full logits, then `torch.nn.functional.cross_entropy`; the reference the others are tested against.

This file belongs to the remote-code closure: optional imports sit under `is_*_available()` checks only.
"""

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


def _sum_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor):
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _chunked_sum_cross_entropy(hidden, weight, bias, labels, chunk_size: int) -> torch.Tensor:
    total = hidden.new_zeros((), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if needs_grad:
            # Recompute this chunk's logits in backward instead of keeping them: memory stays at one chunk.
            total = total + checkpoint(_sum_cross_entropy, h, weight, bias, y, use_reentrant=False)
        else:
            total = total + _sum_cross_entropy(h, weight, bias, y)
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
        lm_head (`torch.nn.Linear`): the target's frozen output embedding.
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
    weight, bias = lm_head.weight, lm_head.bias
    # The LM head may sit on another device than the draft layer when the target is spread over several GPUs.
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1]).to(weight.device)
    targets = labels[:, 1:].reshape(-1).to(weight.device)
    if implementation == "liger":
        total = _liger_sum_cross_entropy(hidden, weight, bias, targets)
    elif implementation == "chunked":
        total = _chunked_sum_cross_entropy(hidden, weight, bias, targets, chunk_size)
    elif implementation == "plain":
        total = _sum_cross_entropy(hidden, weight, bias, targets)
    else:
        raise GlideConfigError(
            f"Unknown loss implementation {implementation!r}: expected 'liger', 'chunked' or 'plain'."
        )
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE_INDEX).sum().clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


__all__ = ["IGNORE_INDEX", "causal_lm_loss", "resolve_loss_implementation"]
