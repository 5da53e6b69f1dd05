"""Model card (`README.md`) of a saved GLIDE draft.

The card's YAML front matter names the target as `base_model`, so the Hub links the draft to the model it drafts for;
its text says what the checkpoint holds (the draft only) and how to load and use it. Deciding when a card is written
(`save_pretrained`, `push_to_hub`) is left to the modeling code.

This file may join the remote-code closure (when `modeling_glide.py` imports it): `huggingface_hub` imports only.
"""

import os

from huggingface_hub import ModelCard, ModelCardData

MODEL_CARD_NAME = "README.md"
MODEL_CARD_TAGS = ["glide", "speculative-decoding", "draft-model"]


def glide_model_card(model, tags: list[str] | None = None) -> ModelCard:
    """The model card of a GLIDE draft.

    Args:
        model (`GlidePreTrainedModel`): the draft; only `model.config` is read.
        tags (`list[str]`, *optional*): tags added to the card's own.

    Returns:
        `huggingface_hub.ModelCard`: front matter with `base_model` (the target's `target_name_or_path`, left out
        when the config names none or a local folder), `library_name` and tags, then a short description and usage
        example.
    """
    config = model.config
    target = config.target_name_or_path
    # The Hub reads `base_model` as a repo id: a target loaded from a local folder is named in the text only.
    base_model = target if target and not os.path.isdir(target) else None
    card_tags = list(MODEL_CARD_TAGS) + [tag for tag in (tags or []) if tag not in MODEL_CARD_TAGS]
    card_data = ModelCardData(library_name="transformers", base_model=base_model, tags=card_tags)
    target_text = f"`{target}`" if target else "its target model"
    body = f"""
# GLIDE draft for {target_text}

A one-layer [GLIDE](https://arxiv.org/abs/2402.02082) draft model for speculative decoding with {target_text}: causal
self-attention over its own last {config.sliding_window} tokens, cross-attention onto the target's cached keys and
values of layer {config.target_kv_layer}, and a SwiGLU MLP. It reuses the target's token embedding, rotary embedding
and LM head.

This checkpoint holds the draft's weights only. Loading it loads the target named by `target_name_or_path` in
`config.json`, or attaches the target passed as `target_model=`.

## Usage

```python
from transformers import AutoModelForCausalLM

draft = AutoModelForCausalLM.from_pretrained("path/to/this/draft", trust_remote_code=True)
target = draft.target
output_ids = target.generate(input_ids, assistant_model=draft, max_new_tokens=128)
```

Greedy outputs equal the target's own greedy outputs; the draft only changes how many tokens each target forward
accepts. It drafts {config.num_draft_tokens} tokens per round (`num_assistant_tokens` in `generation_config.json`).
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def write_model_card(model, save_directory: str | os.PathLike, tags: list[str] | None = None) -> str:
    """Write `glide_model_card(model, tags)` as `README.md` in `save_directory`, replacing any card there.

    Returns:
        `str`: the path of the written card.
    """
    path = os.path.join(save_directory, MODEL_CARD_NAME)
    glide_model_card(model, tags).save(path)
    return path


__all__ = ["MODEL_CARD_NAME", "glide_model_card", "write_model_card"]
