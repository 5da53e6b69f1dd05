"""LoRA on a GLIDE draft: a `peft.LoraConfig` that adapts the draft layer and never the frozen target.

A GLIDE draft holds its target as a submodule (`model.target`), so PEFT sees the target's modules too. PEFT's list
form of `target_modules` matches name *suffixes*, and `["q_proj", "v_proj"]` would wrap every attention layer of
the target as well. `glide_lora_config` therefore gives `target_modules` as one regular expression, which PEFT
applies with `re.fullmatch` to whole module names (`peft/tuners/tuners_utils.py`, `check_target_module_exists`):
it names the draft layer's linear modules from the root, so no name under `model.target.` can match.

```python
from peft import get_peft_model
from glide_hf.lora import glide_lora_config

peft_draft = get_peft_model(draft, glide_lora_config(r=8))   # only `model.layer.*` linears get adapters
```

The adapted draft trains with `Trainer`, saves only adapter weights (`peft_draft.save_pretrained`), reloads on a
saved draft (`PeftModel.from_pretrained(GlideForCausalLM.from_pretrained(base, target_model=t), adapter_dir)`),
and `merge_and_unload()` gives back a plain `GlideForCausalLM` for `draft.generate` and assisted decoding.

What this file leaves to others: the model (`modeling_glide.py`), training (`trainer.py`). The draft is one layer,
so full fine-tuning stays the default; LoRA is for cheap per-domain variants stacked on a published draft.
"""

from collections.abc import Iterable
from typing import TYPE_CHECKING

from transformers.utils import is_peft_available, logging

from .errors import PeftConfigError

if TYPE_CHECKING:
    from peft import LoraConfig

logger = logging.get_logger(__name__)

# Linear modules of the draft layer (`GlideDecoderLayer`), by group. The cross-attention has no key/value
# projections: it reads the target's cache as it is.
DRAFT_LORA_MODULES: dict[str, tuple[str, ...]] = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "cross_attn": ("q_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
# Norms of the draft layer that `modules_to_save` may name. PEFT matches `modules_to_save` by name suffix, so
# `layer.<norm>` is safe (the target's norms sit under `layers.<i>.`), but the draft's final `norm` is not: its
# suffix `model.norm` is also the target's final norm (`model.target.model.norm`).
DRAFT_LAYER_NORMS = ("input_layernorm", "post_self_attention_layernorm", "post_cross_attention_layernorm")
# Module names start at the draft's root: `model.layer.` in `GlideForCausalLM`, `layer.` in `GlideModel`, and
# PEFT's wrapper adds `base_model.model.` when a `PeftModel` is adapted again.
_NAME_PREFIX = r"(?:base_model\.model\.)?(?:model\.)?layer\."


def draft_lora_target_pattern(modules: Iterable[str] = ("self_attn", "cross_attn", "mlp")) -> str:
    """The `target_modules` regular expression for the draft layer's linear modules of the groups `modules`.

    Args:
        modules (`Iterable[str]`): groups of `DRAFT_LORA_MODULES` (`"self_attn"`, `"cross_attn"`, `"mlp"`).

    Returns:
        `str`: a pattern for `re.fullmatch`, e.g. for `("mlp",)`:
        `(?:base_model\\.model\\.)?(?:model\\.)?layer\\.(?:mlp\\.(?:gate_proj|up_proj|down_proj))`.

    Raises:
        `PeftConfigError`: no group, or a group that is not one of `DRAFT_LORA_MODULES`.
    """
    groups = [modules] if isinstance(modules, str) else list(modules)
    if not groups:
        raise PeftConfigError(f"`modules` is empty: name one or more of {sorted(DRAFT_LORA_MODULES)}.")
    unknown = [group for group in groups if group not in DRAFT_LORA_MODULES]
    if unknown:
        raise PeftConfigError(
            f"Unknown draft module group(s) {unknown} in `modules`; the GLIDE draft layer has "
            + ", ".join(f"`{group}` ({', '.join(names)})" for group, names in DRAFT_LORA_MODULES.items())
            + "."
        )
    alternatives = "|".join(rf"{group}\.(?:{'|'.join(DRAFT_LORA_MODULES[group])})" for group in dict.fromkeys(groups))
    return rf"{_NAME_PREFIX}(?:{alternatives})"


def _draft_modules_to_save(names: Iterable[str]) -> list[str]:
    """`modules_to_save` reduced to `layer.<norm>` suffixes, which match the draft layer's norms only."""
    names = [names] if isinstance(names, str) else list(names)
    resolved = []
    for name in names:
        short = name.removeprefix("model.").removeprefix("layer.")
        if short not in DRAFT_LAYER_NORMS:
            raise PeftConfigError(
                f"`modules_to_save` entry {name!r} is not a norm of the draft layer. PEFT matches these names by "
                "suffix, so a name such as `norm` or `mlp` would also wrap modules of the frozen target. Allowed: "
                f"{list(DRAFT_LAYER_NORMS)} (optionally prefixed with `layer.`); the draft's final `norm` cannot be "
                "named without also matching the target's."
            )
        resolved.append(f"layer.{short}")
    return resolved


# `LoraConfig` fields that name or select modules outside `target_modules` (so possibly the target's).
_TARGET_REACHING_FIELDS = ("target_parameters", "trainable_token_indices", "layers_to_transform", "layers_pattern")


def glide_lora_config(
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    modules: Iterable[str] = ("self_attn", "cross_attn", "mlp"),
    **lora_kwargs,
) -> "LoraConfig":
    """A `peft.LoraConfig` whose adapters go on the GLIDE draft layer only, never on the frozen target.

    Args:
        r (`int`, *optional*, defaults to 16): LoRA rank.
        lora_alpha (`int`, *optional*, defaults to 32): LoRA scaling numerator (`lora_alpha / r`).
        lora_dropout (`float`, *optional*, defaults to 0.0): dropout on the LoRA input.
        modules (`Iterable[str]`, *optional*): groups of the draft layer to adapt, from `"self_attn"` (q/k/v/o),
            `"cross_attn"` (q/o) and `"mlp"` (gate/up/down). Default: all three.
        lora_kwargs: other `LoraConfig` fields (`bias`, `use_rslora`, `init_lora_weights`, ...). `task_type`
            defaults to `"CAUSAL_LM"`. `modules_to_save` may name the draft layer's norms only
            (`DRAFT_LAYER_NORMS`); `target_modules` is set here and cannot be given.

    Returns:
        `peft.LoraConfig`: `target_modules` is the regular expression of `draft_lora_target_pattern(modules)`.

    Raises:
        `ImportError`: peft is not installed (`pip install "glide-hf[train]"`).
        `PeftConfigError`: an unknown module group, `target_modules` in `lora_kwargs`, a `modules_to_save` entry
            that would reach the target, `bias` other than "none" / "lora_only", a field that selects modules
            outside the draft layer (`target_parameters`, `trainable_token_indices`, `layers_to_transform`), or a
            rank below 1.

    Example:

    ```python
    >>> from peft import get_peft_model
    >>> peft_draft = get_peft_model(draft, glide_lora_config(r=8, modules=("cross_attn", "mlp")))
    >>> peft_draft.print_trainable_parameters()
    ```
    """
    if not is_peft_available():
        raise ImportError(
            "`glide_lora_config` needs the `peft` package, which is not installed. Install it with "
            '`pip install "glide-hf[train]"`.'
        )
    from peft import LoraConfig

    if "target_modules" in lora_kwargs:
        raise PeftConfigError(
            "`target_modules` is set by `glide_lora_config` (a pattern that matches the draft layer only); choose "
            f"the adapted groups with `modules` (from {sorted(DRAFT_LORA_MODULES)}) instead."
        )
    # PEFT applies these by name or to every module of the model, the frozen target included.
    reaching_the_target = [name for name in _TARGET_REACHING_FIELDS if lora_kwargs.get(name)]
    if reaching_the_target:
        raise PeftConfigError(
            f"`{reaching_the_target[0]}` would make parts of the frozen target trainable or adapt them: "
            "`glide_lora_config` adapts the draft layer only (choose its groups with `modules`)."
        )
    if lora_kwargs.get("bias", "none") not in ("none", "lora_only"):
        raise PeftConfigError(
            f"`bias={lora_kwargs['bias']!r}` trains every bias of the model, the frozen target's included: use "
            "'none' or 'lora_only'."
        )
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise PeftConfigError(f"The LoRA rank `r` must be a positive integer, got {r!r}.")
    pattern = draft_lora_target_pattern(modules)
    if lora_kwargs.get("modules_to_save"):
        lora_kwargs["modules_to_save"] = _draft_modules_to_save(lora_kwargs["modules_to_save"])
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=pattern, **lora_kwargs)


__all__ = ["DRAFT_LAYER_NORMS", "DRAFT_LORA_MODULES", "draft_lora_target_pattern", "glide_lora_config"]
