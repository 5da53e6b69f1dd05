"""GLIDE draft configuration.

`GlideConfig` describes one GLIDE draft layer and the frozen target model it is attached to. The target's config is
nested as `target_config`; the draft's own shape is repeated as plain top-level keys (`hidden_size`,
`num_attention_heads`, ...) so that tools that read standard keys can map a draft without this package.

Paper symbols and their names here (LongSpec, arXiv 2502.17421; GLIDE, arXiv 2402.02082):
    W (self-attention window)             -> `sliding_window`
    l (target layer read by cross-attn)   -> `target_kv_layer`
    j (training lag, "flash noisy" shift) -> `max_draft_lag` (upper bound of the random lag)
    gamma (draft tokens per round)        -> `num_draft_tokens`

This file belongs to the remote-code closure: only `torch`, `transformers` and single-dot relative imports.
"""

import copy
from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

from .errors import GlideConfigError, TargetMismatchError, UnsupportedTargetError

logger = logging.get_logger(__name__)

# Fields of the draft whose values must equal the target's: the draft reuses the target's embedding, LM head and
# rotary embedding, and its cross-attention reads the target's cached keys/values as they are.
TARGET_SHAPE_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")


class GlideConfig(PreTrainedConfig):
    r"""
    Configuration of a GLIDE draft: one decoder layer (sliding-window self-attention, cross-attention onto the
    frozen target's KV cache, SwiGLU MLP) that reuses the target's embedding, rotary embedding and LM head.

    Args:
        target_config (`PreTrainedConfig` or `dict`):
            The config of the target model (a Llama, Qwen2, Qwen3 or Mistral config). The draft's shape is derived
            from it. A copy is stored, so later changes to the live target's config do not leak into the draft.
        target_name_or_path (`str`, *optional*):
            Hub id or local path of the target checkpoint, used by `from_pretrained` when no `target_model` is given.
        sliding_window (`int`, *optional*, defaults to 512):
            Number of the draft's own recent tokens (itself included) its self-attention sees (LongSpec's W).
        target_kv_layer (`int`, *optional*, defaults to -1):
            Index of the target layer whose cached keys/values the cross-attention reads; negative values count
            from the end (-1 is the last layer).
        intermediate_size (`int`, *optional*):
            Width of the draft's SwiGLU MLP. Defaults to the target's.
        attention_bias (`bool`, *optional*, defaults to `True`):
            Whether the q/k/v projections of the self-attention and the q projection of the cross-attention have
            biases (LongSpec's drafts have them, for Llama and Qwen2 targets alike).
        final_norm (`bool`, *optional*, defaults to `True`):
            Whether an RMSNorm sits between the draft layer and the target's LM head. LongSpec's published drafts
            have none: convert them with `final_norm=False`.
        max_draft_lag (`int`, *optional*, defaults to 5):
            Training draws a lag j in `1..max_draft_lag` per batch: a draft query at token t then sees target
            keys of tokens <= t - j only, as at inference, where draft step s sees keys up to s + 1 tokens back.
            Set it to at least the draft depth you decode with (`num_draft_tokens` for chains and CAPE,
            `len(tree_widths)` for trees).
        num_draft_tokens (`int`, *optional*, defaults to 5):
            Tokens drafted per round by `target.generate(..., assistant_model=draft)`; written into the draft's
            `generation_config.json` as `num_assistant_tokens`.
        draft_vocab_size (`int`, *optional*):
            When set, the engine drafts over this many token ids only (the draft's `draft_vocab_ids` buffer, saved
            with its weights; set them with `GlideForCausalLM.set_draft_vocabulary`), reading that many rows of the
            target's LM head per draft step instead of all of them. Output stays the target's: only the proposals
            are restricted. None (default): the whole vocabulary.
        loss_implementation (`str`, *optional*, defaults to `"auto"`):
            How the training loss is computed from the draft's hidden states: `"liger"` (liger-kernel's fused
            linear cross-entropy, CUDA only), `"chunked"` (cross-entropy over chunks of `loss_chunk_size` tokens,
            never holding the full `[tokens, vocab]` logits), `"plain"` (full logits, then cross-entropy), or
            `"auto"` (liger on CUDA when installed, chunked otherwise).
        loss_chunk_size (`int`, *optional*, defaults to 1024):
            Tokens per chunk of the chunked cross-entropy.
        hidden_act (`str`, *optional*, defaults to `"silu"`):
            Activation of the SwiGLU MLP.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the draft's linear layers.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the draft's attention weights during training.

    The keys `hidden_size`, `num_attention_heads`, `num_key_value_heads`, `head_dim`, `vocab_size`,
    `max_position_embeddings`, `rms_norm_eps` and `rope_parameters` are filled from `target_config` when not given;
    the first five must equal the target's.

    Example:

    ```python
    >>> from transformers import LlamaConfig
    >>> from glide_hf import GlideConfig

    >>> target_config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                             num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    >>> config = GlideConfig(target_config=target_config, sliding_window=16)
    >>> config.num_key_value_heads
    2
    ```
    """

    model_type = "glide"
    # Not named `text_config`: `get_text_config()` must return the draft's own config, so that `generate` builds
    # the draft's one-layer sliding-window cache and not a cache shaped like the target.
    sub_configs_defaults = {"target_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", optional=True)}

    target_config: dict | PreTrainedConfig | None = None
    target_name_or_path: str | None = None
    sliding_window: int = 512
    target_kv_layer: int = -1
    intermediate_size: int | None = None
    attention_bias: bool = True
    final_norm: bool = True
    max_draft_lag: int = 5
    num_draft_tokens: int = 5
    draft_vocab_size: int | None = None
    loss_implementation: Literal["auto", "liger", "chunked", "plain"] = "auto"
    loss_chunk_size: int = 1024
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    # Derived from the target when left as None.
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    rms_norm_eps: float | None = None
    rope_parameters: dict | None = None
    # The draft is one sliding-window layer; these two keys let Transformers build its cache.
    num_hidden_layers: int = 1
    layer_types: list[str] | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        if isinstance(self.target_config, dict):
            target_kwargs = dict(self.target_config)
            model_type = target_kwargs.pop("model_type", "llama")
            self.target_config = AutoConfig.for_model(model_type, **target_kwargs)
        elif isinstance(self.target_config, PreTrainedConfig):
            # A copy: PreTrainedConfig's `_attn_implementation` setter recurses into sub-configs, so sharing the live
            # target's config object would let the draft overwrite the target's attention implementation.
            self.target_config = copy.deepcopy(self.target_config)
        if self.target_config is not None:
            self._fill_from_target(self.target_config)
        if self.layer_types is None:
            self.layer_types = ["sliding_attention"] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        self.check_fields()

    def _fill_from_target(self, target: PreTrainedConfig) -> None:
        """Fill the draft's shape keys that were left as None from the target's config."""
        for name, value in target_shape(target).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("intermediate_size", "max_position_embeddings", "rms_norm_eps"):
            if getattr(self, name) is None:
                if getattr(target, name, None) is None:
                    raise UnsupportedTargetError(
                        f"The target config (`model_type={target.model_type!r}`) has no `{name}`: GLIDE needs a "
                        "decoder-only language model with RMSNorm and a rotary KV cache (Llama, Qwen2, Qwen3, "
                        "Mistral)."
                    )
                setattr(self, name, getattr(target, name))
        if self.rope_parameters is None and getattr(target, "rope_parameters", None) is not None:
            self.rope_parameters = copy.deepcopy(target.rope_parameters)

    def check_fields(self) -> None:
        """Raise `GlideConfigError` for an invalid field and `TargetMismatchError` for a shape key that contradicts
        `target_config`."""
        for name in ("sliding_window", "max_draft_lag", "num_draft_tokens", "target_kv_layer", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | None):
                raise GlideConfigError(f"`{name}` must be an integer, got {value!r}.")
        if self.rms_norm_eps is not None and not (
            isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0
        ):
            raise GlideConfigError(f"`rms_norm_eps` must be a positive number, got {self.rms_norm_eps!r}.")
        if not (isinstance(self.attention_dropout, (int, float)) and 0 <= self.attention_dropout < 1):
            raise GlideConfigError(f"`attention_dropout` must be in [0, 1), got {self.attention_dropout!r}.")
        if not (isinstance(self.initializer_range, (int, float)) and self.initializer_range >= 0):
            raise GlideConfigError(
                f"`initializer_range` (the std of the initial weights) must be >= 0, got {self.initializer_range!r}."
            )
        if self.hidden_act not in ACT2FN:
            raise GlideConfigError(
                f"`hidden_act={self.hidden_act!r}` is not an activation Transformers knows (e.g. 'silu', 'gelu')."
            )
        if not isinstance(self.sliding_window, int) or self.sliding_window < 1:
            raise GlideConfigError(
                f"`sliding_window` must be a positive integer (the number of recent draft tokens the self-attention "
                f"sees), got {self.sliding_window!r}. LongSpec uses 512."
            )
        if not isinstance(self.max_draft_lag, int) or self.max_draft_lag < 1:
            raise GlideConfigError(
                f"`max_draft_lag` must be an integer >= 1, got {self.max_draft_lag!r}. Use at least the number of "
                "draft steps per round."
            )
        if not isinstance(self.num_draft_tokens, int) or self.num_draft_tokens < 1:
            raise GlideConfigError(f"`num_draft_tokens` must be an integer >= 1, got {self.num_draft_tokens!r}.")
        if self.draft_vocab_size is not None and (
            not isinstance(self.draft_vocab_size, int)
            or not 1 <= self.draft_vocab_size <= (self.vocab_size or self.draft_vocab_size)
        ):
            raise GlideConfigError(
                f"`draft_vocab_size` must be None (the whole vocabulary) or an integer from 1 to the vocabulary size "
                f"({self.vocab_size}), got {self.draft_vocab_size!r}."
            )
        if self.loss_implementation not in ("auto", "liger", "chunked", "plain"):
            raise GlideConfigError(
                f"`loss_implementation` must be one of 'auto', 'liger', 'chunked', 'plain', "
                f"got {self.loss_implementation!r}."
            )
        if not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 1:
            raise GlideConfigError(f"`loss_chunk_size` must be a positive integer, got {self.loss_chunk_size!r}.")
        if self.num_hidden_layers != 1:
            raise GlideConfigError(
                f"A GLIDE draft is one decoder layer: `num_hidden_layers` must be 1, got {self.num_hidden_layers}."
            )
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise GlideConfigError(f"`intermediate_size` must be positive, got {self.intermediate_size}.")
        if self.target_config is None:
            return
        n_layers = self.target_config.num_hidden_layers
        if not -n_layers <= self.target_kv_layer < n_layers:
            raise GlideConfigError(
                f"`target_kv_layer` must index one of the target's {n_layers} layers (from {-n_layers} to "
                f"{n_layers - 1}), got {self.target_kv_layer}."
            )
        check_target_compatibility(self, self.target_config)

    @property
    def target_kv_layer_index(self) -> int:
        """`target_kv_layer` as a non-negative index into the target's layers."""
        return self.target_kv_layer % self.target_config.num_hidden_layers


def target_shape(config: PreTrainedConfig) -> dict[str, int]:
    """The shape keys of a target config that a GLIDE draft depends on, with `head_dim` derived when absent."""
    missing = [name for name in ("hidden_size", "num_attention_heads", "vocab_size") if not hasattr(config, name)]
    if missing:
        raise UnsupportedTargetError(
            f"The target config (`model_type={config.model_type!r}`) has no {', '.join(missing)}: GLIDE needs a "
            "decoder-only language model with a rotary KV cache (Llama, Qwen2, Qwen3, Mistral)."
        )
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": config.vocab_size,
    }


def check_target_compatibility(config: GlideConfig, target_config: PreTrainedConfig) -> None:
    """Raise `TargetMismatchError` if a target with `target_config` cannot serve a draft built with `config`.

    Used when a config is created, when a draft is loaded and when a target is attached.
    """
    actual = target_shape(target_config)
    expected_shape = {name: getattr(config, name) for name in TARGET_SHAPE_FIELDS}
    # The layer count too: a draft reads one layer by index, and models of one width often differ in depth only
    # (Qwen2.5-14B and -32B: 48 and 64 layers of the same shape).
    built_for = getattr(config, "target_config", None)
    if built_for is not None and hasattr(target_config, "num_hidden_layers"):
        expected_shape["num_hidden_layers"] = built_for.num_hidden_layers
        actual["num_hidden_layers"] = target_config.num_hidden_layers
    for name, expected in expected_shape.items():
        if expected != actual[name]:
            raise TargetMismatchError(
                f"The target's `{name}` is {actual[name]} but the GLIDE draft was built for a target with "
                f"`{name}={expected}`. Attach the target the draft was trained for, or build a new draft with "
                "`GlideForCausalLM.from_target(target)`."
            )


__all__ = ["GlideConfig", "check_target_compatibility", "target_shape"]
