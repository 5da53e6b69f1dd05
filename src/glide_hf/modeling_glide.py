"""GLIDE draft model: one decoder layer attached to a frozen target LLM.

```
x = target.embed_tokens(ids)                    frozen, read through the target
h = x + SelfAttn(input_layernorm(x))            causal, sliding window, the target's rotary embedding
h = h + CrossAttn(post_self_attention_layernorm(h); K_l, V_l)
                                                K_l, V_l: the target's cached (rotated) keys/values of layer l
h = h + MLP(post_cross_attention_layernorm(h))  SwiGLU
y = target.lm_head(norm(h))                     frozen; `norm` only when `config.final_norm`
```

The target is a registered submodule (so `.to()`, `device_map` and Trainer reach it) but is never saved: checkpoints
hold the draft only, and `from_pretrained` attaches the target named by `config.target_name_or_path` or the one
passed as `target_model=`.

Two ways to give the draft its view of the target:
- `target_cache=`: a live target cache (drafting). Every cached position is visible: at inference the cache holds
  verified tokens only, which is exactly what the draft may see.
- nothing: the forward runs the frozen target on `input_ids` under `no_grad` and keeps only the keys/values of
  layer l (training and scoring). A draft query at token t then sees target keys of tokens <= t - lag, the gap
  that drafting produces (draft step s sees keys up to s + 1 tokens back).

This file and its relative imports form the code that `trust_remote_code=True` loads: single-dot imports only.
"""

import contextlib
import copy
import difflib
import os
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import hub as transformers_hub
from transformers.utils import logging

from .configuration_glide import GlideConfig, check_target_compatibility
from .engine import glide_generate, release_cuda_graphs
from .errors import (
    CacheStateError,
    CheckpointFormatError,
    GlideConfigError,
    TargetNotAttachedError,
    TargetNotFoundError,
    UnsupportedGenerationError,
    UnsupportedTargetError,
)
from .loss import causal_lm_loss, head_logits, resolve_loss_implementation
from .model_card import write_model_card
from .norm_kernel import rms_norm_kernel_serves, triton_rms_norm
from .rotary_kernel import rotary_kernel_serves, triton_rotary
from .tree_attention import prefix_attention, prefix_attention_serves

logger = logging.get_logger(__name__)

TARGET_MODULE_NAME = "target"
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_glide.GlideConfig",
    "AutoModel": "modeling_glide.GlideModel",
    "AutoModelForCausalLM": "modeling_glide.GlideForCausalLM",
}


class GlideRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.use_triton_kernel = False  # set by `GlidePreTrainedModel.fused_for_inference`

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_triton_kernel and not torch.is_grad_enabled() and rms_norm_kernel_serves(hidden_states):
            return triton_rms_norm(hidden_states, self.weight, self.variance_epsilon)
        # Llama's RMSNorm (normalise in float32, scale in the input dtype) through torch's `rms_norm` op rather than
        # five elementwise ops: fewer kernels where torch fuses it, which counts in a draft step of many small kernels.
        input_dtype = hidden_states.dtype
        normalized = nn.functional.rms_norm(
            hidden_states.float(), (hidden_states.shape[-1],), eps=self.variance_epsilon
        )
        return self.weight * normalized.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_dim: int = 1) -> torch.Tensor:
    """Rotate `x` `[B, H, S, D]` (or `[B, S, H, D]` with `heads_dim=2`) by `cos`/`sin` `[B, S, D]` from the target's
    rotary embedding."""
    cos, sin = cos.unsqueeze(heads_dim), sin.unsqueeze(heads_dim)
    return (x * cos) + (rotate_half(x) * sin)


def _rotate_for_inference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_dim: int = 1) -> torch.Tensor:
    """`apply_rotary`, in one Triton kernel where it serves (inside `fused_for_inference`, without autograd)."""
    if rotary_kernel_serves(x, cos, sin):
        return triton_rotary(x, cos, sin, heads_dim)
    return apply_rotary(x, cos, sin, heads_dim)


def _concatenated_linear(
    linears: list[nn.Linear], out: tuple[torch.Tensor, torch.Tensor | None] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linear layers that read the same input: outputs side by side. With `out`
    (an earlier result for the same layers), written into its tensors."""
    out_weight, out_bias = out if out is not None else (None, None)
    weight = torch.cat([linear.weight for linear in linears], out=out_weight)
    if all(linear.bias is None for linear in linears):
        return weight, None
    biases = [
        linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features) for linear in linears
    ]
    return weight, torch.cat(biases, out=out_bias)


def _reusable(out, linears: list[nn.Linear]):
    """`out` when it can take the concatenation of `linears` (same total shape, dtype and device), else None."""
    if out is None:
        return None
    weight, bias = out
    first = linears[0].weight
    rows = sum(linear.out_features for linear in linears)
    has_bias = any(linear.bias is not None for linear in linears)
    fits = weight.shape == (rows, first.shape[1]) and weight.dtype == first.dtype and weight.device == first.device
    return out if fits and (bias is not None) == has_bias else None


def _plain_linears(*modules: nn.Module) -> bool:
    """True when every module is a plain `nn.Linear` (no LoRA, quantized or hooked subclass), so its weights may
    be concatenated."""
    return all(
        type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks for module in modules
    )


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """`[B, H_kv, S, D]` -> `[B, H_kv * n_rep, S, D]` (grouped-query attention)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention; `attention_mask` is a boolean `[B, 1, Q, K]` (True = visible) or an additive float mask."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class GlideMLP(nn.Module):
    def __init__(self, config: GlideConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.fused_gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by `fused_for_inference`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is not None and not torch.is_grad_enabled():
            gate, up = nn.functional.linear(x, *self.fused_gate_up).chunk(2, dim=-1)
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def fuse_projections(self, out: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> bool:
        """Concatenate the gate and up projections into one GEMM (inference), into `out`'s tensors where they fit;
        False where the projections are not plain."""
        linears = [self.gate_proj, self.up_proj]
        if not _plain_linears(*linears):
            return False
        self.fused_gate_up = _concatenated_linear(linears, _reusable(out, linears))
        return True

    @property
    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        return self.fused_gate_up

    def unfuse_projections(self) -> None:
        self.fused_gate_up = None


class GlideAttention(nn.Module):
    """Causal sliding-window self-attention over the draft's own recent tokens (its one-layer cache)."""

    def __init__(self, config: GlideConfig):
        super().__init__()
        self.config = config
        self.layer_idx = 0
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        self.fused_qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by `fused_for_inference`

    def fuse_projections(self, out: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> bool:
        """Concatenate the query, key and value projections into one GEMM, whose query and key heads are then
        rotated together (inference), into `out`'s tensors where they fit; False where they are not plain."""
        linears = [self.q_proj, self.k_proj, self.v_proj]
        if not _plain_linears(*linears):
            return False
        self.fused_qkv = _concatenated_linear(linears, _reusable(out, linears))
        return True

    @property
    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        return self.fused_qkv

    def unfuse_projections(self) -> None:
        self.fused_qkv = None

    def project_key_value(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values `[B, H_kv, S, D]` of normed inputs: all a cache needs of tokens never queried."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        return apply_rotary(key_states, cos, sin), value_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings
        if self.fused_qkv is not None and not torch.is_grad_enabled():
            heads, rotated_heads = self.config.num_attention_heads, self.q_proj.out_features // self.head_dim
            rotated_heads += self.k_proj.out_features // self.head_dim
            states = nn.functional.linear(hidden_states, *self.fused_qkv).view(hidden_shape)  # [B, S, H + 2 H_kv, D]
            query_key = _rotate_for_inference(states[:, :, :rotated_heads], cos, sin, heads_dim=2)
            query_states = query_key[:, :, :heads].transpose(1, 2)  # [B, H, S, D]
            key_states = query_key[:, :, heads:].transpose(1, 2)  # [B, H_kv, S, D]
            value_states = states[:, :, rotated_heads:].transpose(1, 2)
        else:
            query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, S, D]
            key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H_kv, S, D]
            value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            query_states, key_states = apply_rotary(query_states, cos, sin), apply_rotary(key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
        )
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())


class GlideCrossAttention(nn.Module):
    """Query-only cross-attention onto one layer of the target's KV cache.

    The keys are the target's cached keys, already rotated at their own positions; the query is rotated at the draft
    token's position, so scores depend on the distance between the two. No key/value projections: the cache is read
    as it is, with the target's grouped-query layout.
    """

    def __init__(self, config: GlideConfig):
        super().__init__()
        self.config = config
        self.layer_idx = 0
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        # Not causal: a query sees every target key the visibility rule allows. Transformers' sdpa path reads
        # `module.is_causal` and, when it is true and no mask is given, would drop all keys beyond the query length.
        self.is_causal = False
        self.q_proj = nn.Linear(
            config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        self.use_triton_kernel = False  # set by `GlidePreTrainedModel.fused_for_inference`

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        target_keys: torch.Tensor,
        target_values: torch.Tensor,
        lag: int | None = None,
        key_padding_mask: torch.Tensor | None = None,
        key_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            target_keys, target_values (`torch.Tensor` of shape `[B, H_kv, K, D]`): the target layer's cache.
            lag (`int`, *optional*): `None` when every (unmasked) key is visible (drafting). Otherwise keys and
                queries are the same tokens and the query at token t sees keys of tokens <= t - lag (training).
            key_padding_mask (`torch.Tensor` of shape `[B, K]`, *optional*): 1 for keys that may be seen, 0 for
                padding or for cache slots beyond a row's verified prefix.
            key_lengths (`torch.Tensor` of shape `[B]`, *optional*): instead of `key_padding_mask` when drafting,
                row b sees keys `0 .. key_lengths[b] - 1`. Inside `fused_for_inference()` on CUDA with Triton, a
                split-KV kernel then reads only those keys.
        """
        input_shape = hidden_states.shape[:-1]
        query_states = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        inference_kernels = self.use_triton_kernel and not torch.is_grad_enabled()
        rotate = _rotate_for_inference if inference_kernels else apply_rotary
        query_states = rotate(query_states, cos, sin)  # [B, H, Q, D]
        keys = target_keys.to(device=query_states.device, dtype=query_states.dtype)
        values = target_values.to(device=query_states.device, dtype=query_states.dtype)
        implementation = self.config._attn_implementation
        if key_lengths is not None:
            if inference_kernels and prefix_attention_serves(keys):
                attn_output = prefix_attention(query_states, keys, values, key_lengths, self.scaling)
                return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
            slots = torch.arange(keys.shape[2], device=key_lengths.device)
            key_padding_mask = slots[None] < key_lengths[:, None]
        if lag is None and key_padding_mask is None:
            attn_output = self._attend(implementation, query_states, keys, values, mask=None, is_causal=False)
        elif lag is None:
            # Drafting in a batch: each row sees its own verified prefix only (slots beyond it hold other tokens).
            visible = key_padding_mask[:, None, None, :].to(device=query_states.device, dtype=torch.bool)
            if _masked_implementation(implementation) == "sdpa":
                attn_output = self._attend_grouped(query_states, keys, values, visible)
            else:
                attn_output = self._attend("eager", query_states, keys, values, mask=visible, is_causal=False)
        elif implementation != "eager" and _is_right_padded(key_padding_mask):
            attn_output = self._attend_with_shift(implementation, query_states, keys, values, lag)
        else:
            attn_output = self._attend_with_mask(implementation, query_states, keys, values, lag, key_padding_mask)
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())

    def _attend(self, implementation, query, keys, values, mask, is_causal) -> torch.Tensor:
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        # No `position_ids` here: flash-attention would read them as packed sequences of equal q/k lengths.
        attn_output, _ = attention_interface(
            self, query, keys, values, mask, dropout=0.0, scaling=self.scaling, is_causal=is_causal
        )
        return attn_output  # [B, Q, H, D]

    def _attend_grouped(self, query, keys, values, mask) -> torch.Tensor:
        """sdpa for drafting, where every query of a row sees the same keys (`mask` `[B, 1, 1, K]`): the query heads
        that share a key head attend as more query rows of it, so the target's keys are read as they are instead of
        being copied once per query head (what grouped-query attention with a mask costs otherwise)."""
        batch, heads, num_queries, head_dim = query.shape
        num_key_heads = keys.shape[1]
        grouped = query.reshape(batch, num_key_heads, heads // num_key_heads * num_queries, head_dim)
        output = nn.functional.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=self.scaling)
        return output.reshape(batch, heads, num_queries, head_dim).transpose(1, 2)  # [B, Q, H, D]

    def _attend_with_shift(self, implementation, query, keys, values, lag) -> torch.Tensor:
        """Training rule `key <= t - lag` as a plain causal attention of queries `lag:` onto keys `:-lag`.

        Worked example, lag 2, tokens 0..5: queries 2..5 and keys 0..3 line up as a causal square, so query 4 sees
        keys 0..2 = tokens <= 4 - 2. Queries 0..1 see no key and get a zero output. Equal lengths keep the causal
        square top-left aligned for every kernel, so sdpa and flash-attention run their fused causal paths.
        """
        batch, heads, seq_len, head_dim = query.shape
        output = query.new_zeros(batch, seq_len, heads, head_dim)
        if lag < seq_len:
            shifted = self._attend(
                implementation,
                query[:, :, lag:],
                keys[:, :, : seq_len - lag],
                values[:, :, : seq_len - lag],
                mask=None,
                is_causal=True,
            )
            output = torch.cat([output[:, :lag], shifted], dim=1)
        return output

    def _attend_with_mask(self, implementation, query, keys, values, lag, key_padding_mask) -> torch.Tensor:
        """Training rule `key <= t - lag` (and key not padding) as an explicit boolean mask."""
        seq_len = query.shape[2]
        token = torch.arange(seq_len, device=query.device)
        visible = token[None, :] <= token[:, None] - lag  # [Q, K]
        visible = visible[None].expand(query.shape[0], -1, -1)  # [B, Q, K]
        if key_padding_mask is not None:
            visible = visible & key_padding_mask[:, None, :].to(device=query.device, dtype=torch.bool)
        has_key = visible.any(-1)  # [B, Q]
        # A row with no visible key would give NaN (and NaN gradients): open key 0 for it, then zero its output.
        visible = visible | (~has_key[..., None] & (token == 0)[None, None, :])
        attn_output = self._attend(
            _masked_implementation(implementation), query, keys, values, mask=visible[:, None], is_causal=False
        )
        return attn_output * has_key[..., None, None].to(attn_output.dtype)


def _masked_implementation(implementation: str) -> str:
    """The attention implementation for a call that needs an arbitrary boolean mask."""
    if implementation in ("eager", "sdpa"):
        return implementation
    logger.warning_once(
        f"GLIDE's cross-attention needs an arbitrary mask here (left-padded training batches, batched drafting), "
        f"which `{implementation}` cannot take; sdpa computes it instead."
    )
    return "sdpa"


def _is_right_padded(padding_mask: torch.Tensor | None) -> bool:
    """True when every row of a `[B, S]` padding mask is ones followed by zeros (or there is no mask)."""
    if padding_mask is None:
        return True
    return bool((padding_mask[:, 1:] <= padding_mask[:, :-1]).all())


class GlideDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: GlideConfig):
        super().__init__()
        self.self_attn = GlideAttention(config)
        self.cross_attn = GlideCrossAttention(config)
        self.mlp = GlideMLP(config)
        self.input_layernorm = GlideRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_self_attention_layernorm = GlideRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_cross_attention_layernorm = GlideRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        target_keys: torch.Tensor | None,
        target_values: torch.Tensor | None,
        lag: int | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        key_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache)
        hidden_states = residual + hidden_states
        if target_keys is not None:  # no target context yet (first round of assisted decoding): skip the term
            residual = hidden_states
            hidden_states = self.cross_attn(
                self.post_self_attention_layernorm(hidden_states),
                position_embeddings,
                target_keys,
                target_values,
                lag=lag,
                key_padding_mask=key_padding_mask,
                key_lengths=key_lengths,
            )
            hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_cross_attention_layernorm(hidden_states))
        return residual + hidden_states


class _DiscardingLayer(DynamicLayer):
    """Cache layer that keeps nothing: lets a training-time target forward store only the layer the draft reads."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return key_states, value_states


class _TargetCacheRecorder:
    """Remembers the cache passed to the target's latest forward call, for the stock assisted-decoding path.

    Transformers' `target.generate(..., assistant_model=draft)` calls `draft.generate(...)` each round without
    handing over the target's cache, so a forward pre-hook on the target notes which cache object the target's
    current `generate` call uses. The reference is weak (a finished call's cache is freed as usual), it is
    overwritten by every target forward (a forward without a cache clears it), and the draft uses it only after
    checking that it covers exactly the tokens it is asked to extend.
    """

    def __init__(self) -> None:
        self._cache_ref: weakref.ReferenceType | None = None
        self._handle = None
        self.num_forwards = 0  # the target's forward calls so far: whether it ran since a given moment

    def install(self, target: nn.Module) -> None:
        self.remove()
        self._handle = target.register_forward_pre_hook(self._record, with_kwargs=True)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._cache_ref = None

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.num_forwards += 1
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._cache_ref = weakref.ref(cache) if isinstance(cache, Cache) else None

    def cache_covering(self, num_tokens: int) -> Cache | None:
        """The recorded cache if it holds exactly `num_tokens` positions, else None."""
        cache = self._cache_ref() if self._cache_ref is not None else None
        if cache is None or cache.get_seq_length() != num_tokens:
            return None
        return cache


def check_target_model(target: nn.Module) -> None:
    """Raise `UnsupportedTargetError` unless `target` is a decoder-only Transformers model with a rotary KV cache."""
    if not isinstance(target, PreTrainedModel):
        raise UnsupportedTargetError(
            f"The target must be a Transformers `PreTrainedModel` (e.g. `LlamaForCausalLM`), got "
            f"`{type(target).__name__}`."
        )
    if getattr(target.config, "is_encoder_decoder", False):
        raise UnsupportedTargetError(
            f"`{type(target).__name__}` is an encoder-decoder model; GLIDE drafts attach to decoder-only models "
            "with a rotary KV cache (Llama, Qwen2, Qwen3, Mistral)."
        )
    decoder = target.get_decoder()
    if not isinstance(getattr(decoder, "rotary_emb", None), nn.Module) or not hasattr(decoder, "layers"):
        raise UnsupportedTargetError(
            f"`{type(target).__name__}` (`model_type={target.config.model_type!r}`) has no rotary position "
            "embedding module (`rotary_emb`) beside its decoder layers: GLIDE reads the target's rotated keys and "
            "rotates its queries with the target's rotary embedding, so it needs a rotary KV cache model such as "
            "Llama, Qwen2, Qwen3 or Mistral."
        )
    if target.get_input_embeddings() is None:
        raise UnsupportedTargetError(f"`{type(target).__name__}` has no input embedding for the draft to reuse.")


def read_target_kv(cache: Cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The valid keys/values `[B, H_kv, S, D]` of one layer of a live target cache, or None if it is empty
    (`CacheStateError` if the cache has no such layer).

    Dynamic layers hold exactly the cached positions, static layers are preallocated (sliced here), and
    sliding-window layers hold the most recent positions only.
    """
    if not cache.layers:  # a new cache, layers made as the target runs
        return None
    if layer_idx >= len(cache.layers):
        raise CacheStateError(
            f"The target cache has {len(cache.layers)} layers, but the draft reads layer {layer_idx}: it is not the "
            "cache of the target this draft was built for."
        )
    layer = cache.layers[layer_idx]
    num_cached = cache.get_seq_length(layer_idx)
    if num_cached == 0 or getattr(layer, "keys", None) is None:
        return None
    keys, values = layer.keys, layer.values
    if not layer.is_sliding and keys.shape[-2] > num_cached:
        keys, values = keys[..., :num_cached, :], values[..., :num_cached, :]
    return keys, values


class GlidePreTrainedModel(PreTrainedModel):
    config: GlideConfig
    config_class = GlideConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GlideDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # The frozen target is attached after initialisation, so only draft modules ever reach this.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, GlideRMSNorm):
            nn.init.ones_(module.weight)

    @property
    def target(self) -> PreTrainedModel | None:
        """The frozen target model, or None before one is attached."""
        return self.get_glide_model()._modules.get(TARGET_MODULE_NAME)

    def get_glide_model(self) -> "GlideModel":
        """The `GlideModel` that holds the draft layer and the target (`self` or `self.model`)."""
        raise NotImplementedError

    def attach_target(self, target_model: PreTrainedModel) -> "GlidePreTrainedModel":
        """Attach a frozen target: checks its shape against `config.target_config`, freezes it (no gradients, eval
        mode) and registers it as the submodule `target`, left out of every checkpoint."""
        glide_model = self.get_glide_model()
        glide_model._attach(target_model)
        prefix = "" if glide_model is self else f"{self.base_model_prefix}."
        # Exact key names: `save_pretrained` drops them, and Trainer does not report them missing on resume.
        self._keys_to_ignore_on_save = [
            f"{prefix}{TARGET_MODULE_NAME}.{name}" for name in target_model.state_dict(keep_vars=True)
        ]
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.target is not None:
            self.target.eval()  # frozen: no dropout, no gradient checkpointing, whatever Trainer asks of the draft
        return self

    @contextlib.contextmanager
    def fused_for_inference(self, kept_weights: dict | None = None) -> Iterator[None]:
        """Inside the block the draft runs fewer, larger kernels, which counts in a draft step at batch 1 (bound by
        how many kernels it launches; the engine decodes inside this block):
        - the self-attention computes query, key and value with one GEMM (query and key heads rotated together) and
          the MLP gate and up with one. The concatenated weights are copies (about a third of the draft layer), made
          on entry and dropped on exit, so weights trained or loaded in between are never stale; projections that
          are not plain `nn.Linear` (LoRA, quantized) stay separate;
        - on CUDA with Triton installed, each RMSNorm and each rotary embedding is one Triton kernel
          (`norm_kernel.py`, `rotary_kernel.py`), and the cross-attention given `target_lengths` reads each row's
          prefix of the target cache in parallel chunks (`tree_attention.prefix_attention`) instead of sdpa over a
          mask of the whole cache.
        Inference only: where gradients are enabled the draft takes its ordinary path (the copies and the Triton
        kernels would not pass gradients to the draft's weights).

        `kept_weights` (a dict, empty at first) keeps the copies' storage from one block to the next: each block
        copies the current weights into the same tensors, so a CUDA graph captured in an earlier block reads them
        (the engine keeps its captured rounds between calls)."""
        kept_weights = {} if kept_weights is None else kept_weights
        fused = []
        for name, module in self.named_modules():
            if isinstance(module, (GlideAttention, GlideMLP)) and module.fuse_projections(kept_weights.get(name)):
                kept_weights[name] = module.fused_weights
                fused.append(module)
        kernel_users = [module for module in self.modules() if isinstance(module, (GlideRMSNorm, GlideCrossAttention))]
        for module in kernel_users:
            module.use_triton_kernel = True
        try:
            yield
        finally:
            for module in fused:
                module.unfuse_projections()
            for module in kernel_users:
                module.use_triton_kernel = False

    def get_input_embeddings(self) -> nn.Module | None:
        return self.target.get_input_embeddings() if self.target is not None else None

    def get_output_embeddings(self) -> nn.Module | None:
        return self.target.get_output_embeddings() if self.target is not None else None

    def save_pretrained(
        self, save_directory, *args, state_dict: dict | None = None, push_to_hub: bool = False, **kwargs
    ):
        """Save the draft only: config (naming the target), generation config, draft weights (no `target.*`
        tensor), a model card (`README.md`) and, when registered for auto classes, the modeling code for
        `trust_remote_code=True`. With `push_to_hub=True` the folder is then uploaded (`repo_id`, `commit_message`,
        `private`, `token`, `create_pr`, `revision` as in Transformers)."""
        push_kwargs = {key: kwargs.pop(key) for key in _PUSH_ONLY_KWARGS if key in kwargs}
        state_dict = self.state_dict() if state_dict is None else state_dict
        state_dict = {name: tensor for name, tensor in state_dict.items() if not _is_target_key(name)}
        if self._auto_class is not None:
            # Both model classes, whichever is saved: `AutoModel` and `AutoModelForCausalLM` then load the same folder.
            self.config.auto_map = dict(REMOTE_CODE_AUTO_MAP)
        result = super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        if kwargs.get("is_main_process", True):
            write_model_card(self, save_directory, tags=self.model_tags)
            if push_to_hub:
                repo_id = push_kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(save_directory))
                return self._upload_folder(save_directory, repo_id, token=kwargs.get("token"), **push_kwargs)
        return result

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ) -> str:
        """Upload the draft (what `save_pretrained` writes, GLIDE model card included) to the Hub.

        Transformers' own `push_to_hub` replaces the card after saving with a generic one that does not name the
        target; this writes the GLIDE card instead.
        """
        if tags:
            self.add_model_tags(tags)
        with tempfile.TemporaryDirectory() as work_dir:
            self.save_pretrained(work_dir, max_shard_size=max_shard_size)
            return self._upload_folder(
                work_dir,
                repo_id,
                token=token,
                commit_message=commit_message,
                commit_description=commit_description,
                private=private,
                revision=revision,
                create_pr=create_pr,
            )

    def _upload_folder(self, folder, repo_id: str, token=None, private=None, commit_message=None, **commit_kwargs):
        repo_id = transformers_hub.hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        return self._upload_modified_files(
            folder,
            repo_id,
            files_timestamps={},
            commit_message=commit_message or "Upload GLIDE draft",
            token=token,
            **commit_kwargs,
        )

    @classmethod
    def from_target(
        cls,
        target_model_or_name_or_path: "PreTrainedModel | str",
        target_kwargs: dict | None = None,
        dtype: torch.dtype | None = None,
        **config_overrides,
    ) -> "GlidePreTrainedModel":
        """Build a freshly initialised draft for a target.

        Args:
            target_model_or_name_or_path (`PreTrainedModel` or `str`): the target, or a Hub id / local path that
                `AutoModelForCausalLM.from_pretrained` loads with `target_kwargs`.
            target_kwargs (`dict`, *optional*): keyword arguments for loading the target (`dtype`, `device_map`...).
            dtype (`torch.dtype`, *optional*): dtype of the draft's weights; float32 by default (master weights for
                training; the forward casts between the draft's and the target's dtypes).
            config_overrides: `GlideConfig` fields, e.g. `sliding_window=512`, `target_kv_layer=-1`.

        Example:

        ```python
        >>> from glide_hf import GlideForCausalLM
        >>> draft = GlideForCausalLM.from_target("Qwen/Qwen2.5-7B-Instruct", target_kwargs={"dtype": "bfloat16"})
        ```
        """
        _check_config_overrides(config_overrides)
        dtype = _as_dtype(dtype)
        if isinstance(target_model_or_name_or_path, (str, os.PathLike)):
            target = _load_target(str(target_model_or_name_or_path), target_kwargs)
            name_or_path = str(target_model_or_name_or_path)
        else:
            target, name_or_path = target_model_or_name_or_path, None
        check_target_model(target)
        name_or_path = name_or_path or target.config._name_or_path or None
        config_overrides.setdefault("target_name_or_path", _target_reference(name_or_path))
        config = GlideConfig(target_config=target.config, **config_overrides)
        model = cls(config)
        # The draft lives where the target's embedding does (its first input), unless the target has no weights
        # (built on the meta device to read its shape only).
        model = model.to(device=_draft_device(target), dtype=dtype)
        return model.attach_target(target)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        target_model: PreTrainedModel | None = None,
        target_kwargs: dict | None = None,
        **kwargs,
    ):
        """Load a draft and attach its target.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a folder or Hub repo written by `save_pretrained`.
            target_model (`PreTrainedModel` or `str`, *optional*): an already loaded target (shared, not copied), or
                a Hub id / local path to load it from with `target_kwargs`. Without it, `config.target_name_or_path`
                is loaded with `AutoModelForCausalLM.from_pretrained`.
            target_kwargs (`dict`, *optional*): keyword arguments for loading the target (`dtype`, `device_map`...).
            kwargs: passed to `PreTrainedModel.from_pretrained` for the draft.
        """
        if "config" not in kwargs:
            _check_is_glide_checkpoint(pretrained_model_name_or_path, kwargs)
        wants_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        # The checkpoint holds the draft alone: any draft tensor missing from it would start from random values.
        missing = [name for name in loading_info.get("missing_keys", ()) if not _is_target_key(name)]
        if missing:
            raise CheckpointFormatError(
                f"The GLIDE checkpoint at `{pretrained_model_name_or_path}` lacks {len(missing)} of the draft's "
                f"tensors (e.g. {sorted(missing)[:3]}), which would start from random values: it is incomplete or "
                "not a GLIDE draft's `save_pretrained` output."
            )
        if isinstance(target_model, (str, os.PathLike)):
            target_model = _load_target(str(target_model), target_kwargs)
        if target_model is None:
            if not model.config.target_name_or_path:
                raise TargetNotFoundError(
                    f"The draft at `{pretrained_model_name_or_path}` has no `target_name_or_path` in its config, so "
                    "its target cannot be loaded automatically: pass it as `target_model=`."
                )
            target_model = _load_target(model.config.target_name_or_path, target_kwargs)
        check_target_model(target_model)  # before `_draft_device` reads its embedding
        if "device_map" not in kwargs:
            model = model.to(_draft_device(target_model))
        model = model.attach_target(target_model)
        return (model, loading_info) if wants_loading_info else model


# `save_pretrained(push_to_hub=True, ...)` keywords that concern the upload, not the files.
_PUSH_ONLY_KWARGS = ("repo_id", "commit_message", "commit_description", "private", "create_pr", "revision")


# Keywords that `PreTrainedConfig` takes besides its fields.
_CONFIG_INIT_KEYWORDS = frozenset(
    {"attn_implementation", "experts_implementation", "output_attentions", "torch_dtype"}
)


def _check_config_overrides(overrides: dict) -> None:
    """`from_target`'s keywords must be `GlideConfig` fields: a misspelt one would otherwise be stored and ignored."""
    known = {name for klass in GlideConfig.__mro__ for name in getattr(klass, "__annotations__", {})}
    known |= _CONFIG_INIT_KEYWORDS
    for name in overrides:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise GlideConfigError(f"`{name}` is not a `GlideConfig` field.{hint}")


def _as_dtype(dtype) -> torch.dtype | None:
    """A `torch.dtype` from a dtype or its name (`"bfloat16"`, `"torch.float16"`)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None) if isinstance(dtype, str) else None
    if not isinstance(resolved, torch.dtype):
        raise GlideConfigError(f"`dtype` must be a `torch.dtype` or its name such as 'bfloat16', got {dtype!r}.")
    return resolved


def _target_reference(name_or_path: str | None) -> str | None:
    """How a draft's config names its target: a Hub id as it is, a local folder as an absolute path (a relative one
    would only load from the folder the draft was made in)."""
    if name_or_path and os.path.isdir(name_or_path) and not os.path.isabs(name_or_path):
        return os.path.abspath(name_or_path)
    return name_or_path


def _draft_device(target: PreTrainedModel) -> torch.device | None:
    """Where a draft for `target` belongs: beside the target's embedding; None for a weightless (meta) target."""
    device = target.get_input_embeddings().weight.device
    return None if device.type == "meta" else device


def _is_target_key(name: str) -> bool:
    return name.startswith(f"{TARGET_MODULE_NAME}.") or f".{TARGET_MODULE_NAME}." in name


def _forgive_missing_target_keys(module: nn.Module, incompatible_keys) -> None:
    """`load_state_dict` post-hook: the frozen target is not part of the draft's state, so a state dict without its
    tensors (a draft-only checkpoint, DeepSpeed's or FSDP's resume state) loads strictly; a missing draft tensor is
    still reported."""
    incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if not _is_target_key(key)]


def _check_is_glide_checkpoint(name_or_path, kwargs: dict) -> None:
    hub_kwargs = {key: kwargs[key] for key in ("cache_dir", "revision", "token", "local_files_only") if key in kwargs}
    try:
        config_dict, _ = GlideConfig.get_config_dict(name_or_path, **hub_kwargs)
    except OSError as error:
        raise GlideConfigError(
            f"No GLIDE draft config found at `{name_or_path}` ({error}). Pass a folder or Hub repo written by a "
            "GLIDE draft's `save_pretrained`, or build a new draft with `GlideForCausalLM.from_target(target)`."
        ) from error
    model_type = config_dict.get("model_type")
    if not config_dict:
        raise GlideConfigError(
            f"No GLIDE draft config found at `{name_or_path}`: it has no config.json. Pass a folder or Hub repo "
            "written by a GLIDE draft's `save_pretrained`, or build a new draft with "
            "`GlideForCausalLM.from_target(target)`."
        )
    if model_type != GlideConfig.model_type:
        raise GlideConfigError(
            f"`{name_or_path}` holds a `model_type={model_type!r}` config, not a GLIDE draft (`model_type='glide'`). "
            f"To build a new draft for this model, use `GlideForCausalLM.from_target({str(name_or_path)!r})`."
        )


def _load_target(name_or_path: str, target_kwargs: dict | None) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **(target_kwargs or {}))
    except OSError as error:
        raise TargetNotFoundError(
            f"The GLIDE draft's target `{name_or_path}` could not be loaded: {error}\nPass the target as "
            "`target_model=`, or fix `target_name_or_path` in the draft's config.json."
        ) from error


class GlideModel(GlidePreTrainedModel):
    """The GLIDE draft layer on the frozen target's embedding; returns the draft's hidden states."""

    def __init__(self, config: GlideConfig, target_model: PreTrainedModel | None = None):
        if getattr(config, "target_config", None) is None:
            raise GlideConfigError(
                "This GlideConfig names no target config, and a GLIDE draft takes its shape from its target: build "
                "it with `GlideForCausalLM.from_target(target)`, or from `GlideConfig(target_config=target.config)`."
            )
        super().__init__(config)
        self.layer = GlideDecoderLayer(config)
        self.norm = GlideRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if config.final_norm else None
        self.gradient_checkpointing = False
        self.post_init()
        self._cache_recorder = _TargetCacheRecorder()
        self.register_load_state_dict_post_hook(_forgive_missing_target_keys)
        if target_model is not None:
            self.attach_target(target_model)

    def get_glide_model(self) -> "GlideModel":
        return self

    def _attach(self, target_model: PreTrainedModel) -> None:
        check_target_model(target_model)
        check_target_compatibility(self.config, target_model.config)
        target_model.requires_grad_(False)
        target_model.eval()
        self._cache_recorder.remove()
        # Set in `_modules` directly: `add_module` refuses a name that is also a property (`target`).
        self._modules[TARGET_MODULE_NAME] = target_model
        self._cache_recorder.install(target_model)

    def recorded_target_cache(self, num_tokens: int) -> Cache | None:
        """The cache of the target's current `generate` call if it holds exactly `num_tokens` positions."""
        return self._cache_recorder.cache_covering(num_tokens)

    @property
    def num_target_forwards(self) -> int:
        """How many forward calls the attached target has made (counted since it was attached)."""
        return self._cache_recorder.num_forwards

    def _require_target(self) -> PreTrainedModel:
        if self.target is None:
            raise TargetNotAttachedError(
                "This GLIDE draft has no target attached. Load it with `from_pretrained(path, target_model=target)` "
                "or call `attach_target(target)` first."
            )
        return self.target

    @torch.no_grad()
    def capture_target_kv(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, position_ids: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the frozen target on `input_ids` and return the keys/values `[B, H_kv, S, D]` of the layer the
        cross-attention reads. The other layers' keys/values are dropped as soon as they are computed, and the
        layers after the one read do not run at all."""
        target = self._require_target()
        layer_idx = self.config.target_kv_layer_index
        num_layers = self.config.target_config.num_hidden_layers
        capture = Cache(layers=[DynamicLayer() if i == layer_idx else _DiscardingLayer() for i in range(num_layers)])
        decoder = target.get_decoder()
        # Transformers' decoders run `layers[: config.num_hidden_layers]` (its early-exit drafting uses the same
        # switch): lowered for this call only, restored whatever happens.
        full_depth = decoder.config.num_hidden_layers
        decoder.config.num_hidden_layers = layer_idx + 1
        try:
            decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=capture,
                use_cache=True,
            )
        finally:
            decoder.config.num_hidden_layers = full_depth
        return capture.layers[layer_idx].keys, capture.layers[layer_idx].values

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        target_cache: Cache | None = None,
        draft_lag: int | None = None,
        target_attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        target_lengths: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `[batch, seq]`): token ids.
            attention_mask (`torch.Tensor` of shape `[batch, seq]` or `[batch, past + seq]`, *optional*): 1 for
                tokens, 0 for padding.
            position_ids (`torch.LongTensor` of shape `[batch, seq]`, *optional*): positions for the draft and, when
                the forward runs the target, for the target too (e.g. Anchor-Offset positions). Derived from
                `attention_mask` when absent.
            cache (`Cache`, *optional*): the draft's own one-layer cache (sliding window).
            target_cache (`Cache`, *optional*): a live target cache whose positions are all visible to the draft
                (drafting). An empty cache means no target context yet. When absent, the target runs on `input_ids`.
            draft_lag (`int`, *optional*): when the target runs here, a query at token t sees target keys of tokens
                <= t - draft_lag. Default: random in `1..config.max_draft_lag` in training mode, 1 in eval mode.
            target_attention_mask (`torch.Tensor` of shape `[batch, target_slots]`, *optional*): with
                `target_cache`, which of its slots each row may see (the GLIDE engine's per-row verified prefixes).
            position_embeddings (`tuple(torch.Tensor, torch.Tensor)` of shape `[batch, seq, head_dim]`, *optional*):
                the target's rotary (cos, sin) at `position_ids`, when the caller already holds them (the GLIDE
                engine gathers them from a table made once per call). Computed from `position_ids` when absent.
            target_lengths (`torch.Tensor` of shape `[batch]`, *optional*): with `target_cache`, instead of
                `target_attention_mask`: row b sees the first `target_lengths[b]` slots of the target cache (the
                engine's verified prefixes). Inside `fused_for_inference()` on CUDA with Triton installed, the
                cross-attention then reads only those slots, in parallel chunks.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        target = self._require_target()
        if inputs_embeds is None:
            inputs_embeds = target.get_input_embeddings()(input_ids)
        inputs_embeds = inputs_embeds.to(self.layer.input_layernorm.weight.dtype)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        seq_len = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = _default_position_ids(attention_mask, past_length, seq_len, inputs_embeds.device)

        if target_lengths is not None and (target_cache is None or target_attention_mask is not None):
            raise ValueError(
                "`target_lengths` describes which slots of `target_cache` each row sees: pass it with `target_cache` "
                "and without `target_attention_mask`."
            )
        if target_lengths is not None and (
            not isinstance(target_lengths, torch.Tensor)
            or target_lengths.shape != (inputs_embeds.shape[0],)
            or target_lengths.dtype.is_floating_point
            or target_lengths.dtype == torch.bool
        ):
            shown = (
                (target_lengths.dtype, tuple(target_lengths.shape))
                if torch.is_tensor(target_lengths)
                else target_lengths
            )
            raise ValueError(
                f"`target_lengths` must be an integer tensor of shape [batch] = [{inputs_embeds.shape[0]}], got "
                f"{shown!r}."
            )
        key_padding_mask, lag = None, None
        if target_cache is not None:
            target_kv = read_target_kv(target_cache, self.config.target_kv_layer_index)
            key_padding_mask = target_attention_mask
        else:
            if past_length > 0:
                raise CacheStateError(
                    f"The draft's `cache` already holds {past_length} tokens, but no `target_cache` was given: the "
                    "target can only be run here on a whole sequence. Pass the target's cache of the same prefix "
                    "as `target_cache=`, or call without `cache`."
                )
            if input_ids is None:
                raise ValueError("Without `target_cache`, the target runs on the same tokens: pass `input_ids`.")
            if attention_mask is None:
                # Explicit: without a 2-D mask, Transformers reads jumps in `position_ids` (Anchor-Offset positions)
                # as boundaries of packed sequences.
                attention_mask = torch.ones_like(input_ids)
            target_kv = self.capture_target_kv(input_ids, attention_mask, position_ids)
            key_padding_mask = attention_mask
            lag = draft_lag if draft_lag is not None else self._default_lag()
            if not isinstance(lag, int) or lag < 1:
                raise GlideConfigError(f"`draft_lag` must be an integer >= 1, got {lag!r}.")
        target_keys, target_values = target_kv if target_kv is not None else (None, None)

        if position_embeddings is None:
            position_embeddings = target.get_decoder().rotary_emb(inputs_embeds, position_ids)
        self_attention_mask = create_sliding_window_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = self.layer(
            inputs_embeds,
            position_embeddings,
            self_attention_mask,
            target_keys,
            target_values,
            lag,
            key_padding_mask,
            cache=cache,
            key_lengths=target_lengths,
        )
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)

    @torch.no_grad()
    def self_attention_key_value(
        self, input_ids: torch.LongTensor, position_ids: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft self-attention's keys/values `[B, H_kv, S, D]` for tokens at `position_ids`, without running
        the rest of the layer: a token's self-attention keys depend on the token and its position only, so this is
        all a prompt contributes to later draft steps through the sliding window."""
        target = self._require_target()
        embeds = target.get_input_embeddings()(input_ids).to(self.layer.input_layernorm.weight.dtype)
        position_embeddings = target.get_decoder().rotary_emb(embeds, position_ids)
        return self.layer.self_attn.project_key_value(self.layer.input_layernorm(embeds), position_embeddings)

    def _default_lag(self) -> int:
        if not self.training:
            return 1
        # Drawn from torch's generator so that seeded runs (Trainer's `seed`) are reproducible.
        return int(torch.randint(1, self.config.max_draft_lag + 1, ()).item())


def _default_position_ids(attention_mask, past_length: int, seq_len: int, device) -> torch.LongTensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + seq_len, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -seq_len:].to(device)


class GlideForCausalLM(GlidePreTrainedModel, GenerationMixin):
    """A GLIDE draft with the target's LM head: next-token logits, training loss, and drafting for
    `target.generate(..., assistant_model=draft)`."""

    def __init__(self, config: GlideConfig, target_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.model = GlideModel(config)
        # The token ids the engine drafts over (`config.draft_vocab_size` of them; set by `set_draft_vocabulary`
        # and saved with the weights), or None for the whole vocabulary.
        ids = None if config.draft_vocab_size is None else torch.arange(config.draft_vocab_size)
        self.register_buffer("draft_vocab_ids", ids, persistent=True)
        self.post_init()
        self.generation_config = default_generation_config(config)
        if target_model is not None:
            self.attach_target(target_model)

    def get_glide_model(self) -> GlideModel:
        return self.model

    def set_draft_vocabulary(self, token_ids: Sequence[int] | torch.Tensor | None) -> "GlideForCausalLM":
        """Let the engine draft over `token_ids` only, or over the whole vocabulary again with None.

        A draft step then reads those rows of the target's LM head instead of all of them (a Llama-3 head is
        128256 x 4096: 1 GB in bf16, most of a draft step's memory traffic). The output is still the target's: the
        target verifies, and a token outside the set is never proposed but still produced by the target. Pick the
        most frequent tokens of your data (`glide_hf.draft_vocab.most_frequent_token_ids`, or
        `glide-hf draft-vocab`). The ids are saved with the draft (`draft_vocab_ids`, `config.draft_vocab_size`).
        The stock assisted path (`target.generate(..., assistant_model=draft)`) always drafts over the whole
        vocabulary.
        """
        if token_ids is None:
            self.draft_vocab_ids = None
            self.config.draft_vocab_size = None
            return self
        if not isinstance(token_ids, torch.Tensor):
            token_ids = list(token_ids)  # a set, range or generator too
            if not token_ids:
                raise GlideConfigError("`token_ids` is empty: give at least one token id, or None for all of them.")
        ids = torch.as_tensor(token_ids)
        vocab_size = self.config.vocab_size
        if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise GlideConfigError(
                f"`token_ids` must be a non-empty 1-D list of integer token ids, got shape {tuple(ids.shape)} and "
                f"dtype {ids.dtype}."
            )
        ids = ids.long().cpu()
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise GlideConfigError(
                f"`token_ids` must lie in 0..{vocab_size - 1} (the vocabulary), got values from {int(ids.min())} to "
                f"{int(ids.max())}."
            )
        count = ids.numel()
        ids = ids.unique(sorted=True)
        if ids.numel() != count:
            raise GlideConfigError("`token_ids` holds repeated ids: give each token once.")
        self.draft_vocab_ids = ids.to(self.model.layer.input_layernorm.weight.device)  # the engine moves it
        self.config.draft_vocab_size = int(ids.numel())
        return self

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        target_cache: Cache | None = None,
        draft_lag: int | None = None,
        target_attention_mask: torch.Tensor | None = None,
        return_logits: bool | None = None,
        target_lengths: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `[batch, seq]`, *optional*): targets for the shifted next-token
                cross-entropy (`-100` = ignored), computed with `config.loss_implementation`.
            logits_to_keep (`int` or `torch.Tensor`, *optional*): keep logits of the last n positions only.
            return_logits (`bool`, *optional*): with `labels` and a fused loss (liger or chunked), logits are not
                computed unless this is True, so that the `[batch, seq, vocab]` tensor never exists in training.
            Other arguments: see `GlideModel.forward`.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            target_cache=target_cache,
            draft_lag=draft_lag,
            target_attention_mask=target_attention_mask,
            target_lengths=target_lengths,
        )
        hidden_states = outputs.last_hidden_state
        lm_head = self.get_output_embeddings()
        loss, logits = None, None
        implementation = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != hidden_states.shape[:2]:
                shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(
                    f"`labels` must have the shape of the input tokens {tuple(hidden_states.shape[:2])}, got {shape} "
                    "(the loss shifts them by one itself)."
                )
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError(f"`labels` must hold integer token ids (-100 to ignore), got dtype {labels.dtype}.")
            implementation = resolve_loss_implementation(self.config.loss_implementation, hidden_states.device)
            loss = causal_lm_loss(
                hidden_states,
                lm_head,
                labels,
                implementation=implementation,
                chunk_size=self.config.loss_chunk_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        if labels is None or return_logits or implementation == "plain":
            if isinstance(logits_to_keep, int):
                kept = hidden_states[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden_states
            else:
                kept = hidden_states[:, logits_to_keep, :]
            logits = head_logits(kept, lm_head).float()
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)

    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        draft_strategy: str = "chain",
        num_draft_tokens: int | None = None,
        tree_widths: tuple[int, ...] | None = None,
        cape_bins: tuple[int, ...] | None = None,
        **kwargs,
    ):
        r"""Generate with the target, several tokens per target forward: output as `target.generate` would give.

        Greedy output equals `target.generate(input_ids, ...)`; sampled output follows the same distribution.
        Batches of any size with left-padded prompts work: each row accepts its own number of tokens per round and
        finished rows leave the batch.

        Args:
            input_ids (`torch.LongTensor` of shape `[batch, length]`): prompts, left-padded.
            attention_mask (`torch.Tensor` of shape `[batch, length]`, *optional*): 0 on padding; without it,
                padding is told from `pad_token_id` as `target.generate` tells it.
            generation_config (`GenerationConfig`, *optional*): as for `target.generate`; defaults to the target's.
                Supported: greedy and sampling (`temperature`, `top_k`, `top_p`, `min_p`; sampled chains use
                speculative sampling with residual resampling), `max_new_tokens`, `max_length`, `min_new_tokens`,
                `eos_token_id` (each row stops on its own), `pad_token_id`, `repetition_penalty` (per tree node,
                on the device), other history-dependent processing (`no_repeat_ngram_size`, a `logits_processor`
                list: applied per tree node with its own history on the host, without CUDA graphs),
                `num_return_sequences` (with sampling), `return_dict_in_generate` (then acceptance statistics are
                returned). Scores, attentions and hidden states are not returned.
            draft_strategy (`str`, *optional*, defaults to `"chain"`): `"chain"` (`num_draft_tokens` tokens a round),
                `"tree"` (LongSpec's dynamic beam with `tree_widths`, default `(4, 16, 16, 16, 16)`), or `"cape"`
                (a greedy spine of `num_draft_tokens` with confidence-dependent side candidates, `cape_bins`).
            num_draft_tokens (`int`, *optional*): draft depth; defaults to `config.num_draft_tokens`.
            kwargs: `stopping_criteria`, `streamer`, `use_cuda_graphs` (default: on when the inputs are on CUDA;
                each round is then replayed as one captured CUDA graph, kept with its buffers for the next call with
                the same settings: see `release_cuda_graphs`), `verify_attention` (`"auto"`, `"split"` or
                `"masked"`: how the verify forward attends, see `glide_hf.engine.glide_generate`), `split_kernel`
                (`"auto"`, `"triton"`, `"flash"` or `"torch"`: the split attention's kernel),
                `num_draft_tokens_schedule` (`"constant"` or `"heuristic"`: a chain whose length adapts), and
                generation settings (`max_new_tokens=...`).

        Returns:
            `torch.LongTensor` `[batch, length + new]`, or `GlideGenerateOutput` with `return_dict_in_generate=True`.

        Transformers' assisted decoding also calls this method (with `generation_config.is_assistant` set) to draft
        for `target.generate(..., assistant_model=draft)`; that path is batch size 1 and chain-only.
        """
        if generation_config is not None and generation_config.is_assistant:
            return self._draft_for_assisted_decoding(input_ids, generation_config, **kwargs)
        return glide_generate(
            self,
            input_ids,
            attention_mask=attention_mask,
            generation_config=generation_config,
            draft_strategy=draft_strategy,
            num_draft_tokens=num_draft_tokens,
            tree_widths=tree_widths,
            cape_bins=cape_bins,
            **kwargs,
        )

    def release_cuda_graphs(self) -> None:
        """Free the CUDA graph and the buffers that `generate` keeps from one call to the next.

        With CUDA graphs, `generate` keeps its last captured round with the buffers it reads (the target's KV cache
        for the call's context, the draft's ring, the row state) on the draft, so that the next call with the same
        batch size, settings and cache size (prompt lengths within `engine.GRAPH_SLOT_STEP` tokens of each other)
        replays it instead of capturing a new one. Call this to give that GPU memory back, e.g. before training.
        """
        release_cuda_graphs(self)

    def _draft_for_assisted_decoding(self, input_ids, generation_config, **kwargs):
        """Draft tokens for `target.generate(..., assistant_model=draft)`.

        Transformers' assisted decoding calls `generate` every round with the accepted tokens and the draft's own
        cache; the draft reads the target's cache of the same call (see `_TargetCacheRecorder`).
        """
        if input_ids is None or input_ids.shape[0] != 1:
            raise UnsupportedGenerationError(
                "Transformers' assisted decoding supports batch size 1 only; for batches call the draft's own "
                "engine: `draft.generate(input_ids, attention_mask=...)`."
            )
        if kwargs.get("cache") is None:
            # First round of a new `target.generate` call: the target has not run yet, so any recorded cache belongs
            # to an earlier call. Draft one token without target context; the next rounds read the live cache.
            target_cache = DynamicCache()
            self._target_forwards_at_first_round = self.model.num_target_forwards
            max_new_tokens = min(1, kwargs.get("max_new_tokens", 1))
            kwargs["max_new_tokens"] = max_new_tokens
            kwargs["min_new_tokens"] = min(kwargs.get("min_new_tokens") or 0, max_new_tokens)
        else:
            # The target's cache holds every accepted token but the newest one (its "bonus" token).
            target_cache = self.model.recorded_target_cache(input_ids.shape[1] - 1)
            if target_cache is None:
                if self.model.num_target_forwards == getattr(self, "_target_forwards_at_first_round", None):
                    logger.warning_once(
                        "GLIDE's attached target (`draft.target`) has not run during this `generate` call: the model "
                        "calling `generate` is another one, likely a second copy of the target. The draft drafts "
                        "without target context (outputs stay exact, acceptance drops, two copies use the memory): "
                        "call `draft.target.generate(...)`, or load the draft with `target_model=` your target."
                    )
                else:
                    logger.warning_once(
                        "GLIDE could not find the target's cache of the current `generate` call; drafting without "
                        "target context this round (outputs stay exact, acceptance drops)."
                    )
                target_cache = DynamicCache()
        # Transformers hands these over beside `generation_config`; folded into a copy of it, `generate` does not
        # warn about the mix on every call.
        generation_config = copy.deepcopy(generation_config)
        for key in ("max_new_tokens", "min_new_tokens", "use_cache"):
            if key in kwargs:
                setattr(generation_config, key, kwargs.pop(key))
        return super().generate(
            input_ids=input_ids, generation_config=generation_config, target_cache=target_cache, **kwargs
        )


def default_generation_config(config: GlideConfig) -> GenerationConfig:
    """Assisted-decoding settings a GLIDE draft ships with: a constant `num_draft_tokens` per round, and no
    confidence cut-off (Transformers' default 0.4 stops an unsure draft after one token)."""
    return GenerationConfig(
        num_assistant_tokens=config.num_draft_tokens,
        num_assistant_tokens_schedule="constant",
        assistant_confidence_threshold=0.0,
    )


__all__ = [
    "GlideAttention",
    "GlideCrossAttention",
    "GlideDecoderLayer",
    "GlideForCausalLM",
    "GlideMLP",
    "GlideModel",
    "GlidePreTrainedModel",
    "GlideRMSNorm",
    "check_target_model",
    "default_generation_config",
    "read_target_kv",
]
