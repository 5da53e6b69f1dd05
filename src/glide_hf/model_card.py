"""Model card (`README.md`) of a saved GLIDE draft.

The card's YAML front matter names the target as `base_model`, so the Hub links the draft to the model it drafts for,
and lists `library_name`, tags, `license` and the training `datasets`. Its text says what the checkpoint holds (the
draft only), how to load and use it, the draft's settings, and, when given, how it was trained (`training`) and what
it measured (`results`: tau, the tokens per target forward, and the speedup over plain decoding). Deciding when a card
is written (`save_pretrained`, `push_to_hub`, `train_glide`) is left to the callers.

`model_cards/template.md` documents the card's fields and the two inputs for readers; the template itself is embedded
here, because this file belongs to the remote-code closure (`modeling_glide.py` imports it): it is copied next to a
saved draft without the rest of the package, so it imports the standard library (`os`, `json`, `math`),
`huggingface_hub` and `.errors` only.

Inputs (each a `dict`, or the path of a JSON file holding one):

- `results`: a benchmark result, in one of these shapes:
  - `{"results": [row, ...], "device": ..., "torch": ..., "transformers": ..., "date": ..., "command": ...}`
    (what `examples/fast_generate.py --output-json` writes);
  - `{"summaries": [row, ...], "arguments": {"prompts": ...}, "settings": {...}, "device": ...}` (what
    `glide-hf bench --output-json` writes: one row per method and temperature);
  - `{"metrics": {...}}` (what `glide-hf train --output-json` writes), or one row as a flat dict (a trainer's
    `all_results.json`), or a list of rows.

  A row's fields, all optional (`RESULT_COLUMNS`): `dataset`, `method`, `draft_strategy`, `num_draft_tokens`,
  `tree_widths`, `temperature`, `batch_size`, `max_new_tokens`, `tau` (also read from `tokens_per_target_forward` or
  `eval_tokens_per_target_forward`), `speedup` (else `tokens_per_second / baseline_tokens_per_second`),
  `tokens_per_second`, `baseline_tokens_per_second`, `eval_loss`. Other fields are ignored; a row needs one measured
  value (`METRIC_COLUMNS`). `dataset`, `method` and `draft_strategy` are strings (`TEXT_COLUMNS`), `tree_widths` a
  list of integers, the others finite numbers.
- `training`: `datasets` (Hub ids, also written to the front matter), `data` (free text or paths, text only),
  `stages` (a list of dicts of the same fields, one per stage, with an optional `name`), and any other key as a
  setting (e.g. `learning_rate`). The JSON printed by `glide-hf train --dry-run` (`{"glide": ..., "training": ...}`)
  is accepted as it is, alone or as a stage: its main settings (`DRY_RUN_SETTINGS`) are kept.
"""

import json
import math
import os

from huggingface_hub import ModelCard, ModelCardData

from .errors import ModelCardError

MODEL_CARD_NAME = "README.md"
MODEL_CARD_TAGS = ["glide", "speculative-decoding", "draft-model"]
PAPER_URL = "https://arxiv.org/abs/2402.02082"
# Placeholder of the usage snippet when the card is written before the draft has a repo id.
DEFAULT_REPO_ID = "path/to/this/draft"

# (column name, heading) of the results table, in order. A row's other fields are ignored.
RESULT_COLUMNS = (
    ("dataset", "data"),
    ("method", "method"),
    ("draft_strategy", "strategy"),
    ("num_draft_tokens", "draft tokens"),
    ("tree_widths", "tree widths"),
    ("temperature", "temperature"),
    ("batch_size", "batch"),
    ("max_new_tokens", "new tokens"),
    ("tau", "tau"),
    ("speedup", "speedup"),
    ("tokens_per_second", "tokens/s"),
    ("baseline_tokens_per_second", "baseline tokens/s"),
    ("eval_loss", "eval loss"),
)
METRIC_COLUMNS = ("tau", "speedup", "tokens_per_second", "eval_loss")
# Columns holding names; `tree_widths` holds a list of integers, and every other column a finite number.
TEXT_COLUMNS = ("dataset", "method", "draft_strategy")
# Other names of a row's fields: the engine's statistic, the trainer's evaluation metric, a short strategy key.
RESULT_ALIASES = {
    "tokens_per_target_forward": "tau",
    "eval_tokens_per_target_forward": "tau",
    "strategy": "draft_strategy",
}
# Fields of a benchmark result file that describe the measurement as a whole, in the order they are written.
RESULT_CONTEXT_FIELDS = ("device", "torch", "transformers", "date", "command", "notes")
# Settings kept from `glide-hf train --dry-run` output: what someone reproducing the run needs first.
DRY_RUN_SETTINGS = {
    "glide": (
        "target", "data", "data_format", "max_length", "packing", "anchor_offset", "num_anchors",
        "max_position_offset", "max_draft_lag", "init_draft",
    ),
    "training": (
        "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "per_device_train_batch_size",
        "gradient_accumulation_steps", "num_train_epochs", "max_steps", "bf16", "seed",
    ),
}  # fmt: skip

CARD_TEMPLATE = """
# GLIDE draft for {target_text}

A one-layer [GLIDE]({paper_url}) draft model for speculative decoding with {target_text}: causal self-attention over
its own last {sliding_window} tokens, cross-attention onto the target's cached keys and values of {target_layer},
and a SwiGLU MLP. It reuses the target's token embedding, rotary embedding and LM head.

This checkpoint holds the draft's weights only. Loading it loads the target named by `target_name_or_path` in
`config.json` ({target_text}), or attaches the target passed as `target_model=`.

## Usage

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

draft = AutoModelForCausalLM.from_pretrained(
    "{repo_id}", trust_remote_code=True, target_kwargs={{"dtype": torch.bfloat16, "device_map": "cuda"}}
)
target = draft.target
tokenizer = AutoTokenizer.from_pretrained("{tokenizer_name}")
inputs = tokenizer("Write a haiku about caches.", return_tensors="pt").to("cuda")

output_ids = target.generate(**inputs, assistant_model=draft, max_new_tokens=128)  # Transformers' assisted decoding
output_ids = draft.generate(**inputs, max_new_tokens=128)  # the GLIDE engine: batches, trees, CUDA graphs
```

`trust_remote_code=True` runs the modeling code saved with this draft; with `pip install glide-hf`, `import glide_hf`
registers it instead. Greedy outputs equal the target's own greedy outputs and sampled outputs follow the target's
distribution: the draft only changes how many tokens each target forward pass yields.

## Draft settings

{settings_table}

## Training

{training_text}

## Results

{results_text}
"""


def glide_model_card(
    model,
    tags: list[str] | None = None,
    results: dict | list | str | os.PathLike | None = None,
    training: dict | str | os.PathLike | None = None,
    license: str | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The model card of a GLIDE draft.

    Args:
        model (`GlidePreTrainedModel`): the draft; only `model.config` is read.
        tags (`list[str]`, *optional*): tags added to the card's own.
        results (`dict`, `list` or `str`, *optional*): measured acceptance and speed, or the path of a JSON file
            holding them (see the module docstring); a table in the "Results" section.
        training (`dict` or `str`, *optional*): training data and settings, or the path of a JSON file holding them
            (see the module docstring); the "Training" section, and `datasets` in the front matter.
        license (`str`, *optional*): the card's `license` (a Hub licence id such as `"apache-2.0"`; usually the
            target's).
        repo_id (`str`, *optional*): the draft's Hub repo id, used in the usage example.

    Returns:
        `huggingface_hub.ModelCard`: front matter with `base_model` (the target's `target_name_or_path`, left out
        when the config names none or a local folder), `library_name`, `license`, `datasets` and tags, then the
        description, usage example, draft settings, training and results.

    Raises:
        `ModelCardError`: `results` or `training` cannot be read or has no usable content, or an argument (or
        `model.config.target_name_or_path`) is not of the type given above.

    Example:

    ```python
    >>> from glide_hf.model_card import glide_model_card
    >>> card = glide_model_card(draft, results="bench.json", training={"datasets": ["DKYoon/SlimPajama-6B"]},
    ...                         license="apache-2.0", repo_id="me/glide-qwen2.5-7b")
    >>> card.save("README.md")
    ```
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ModelCardError(
            f"`model` must be a GLIDE draft (its `config` is read), found a {type(model).__name__} without `config`."
        )
    target = getattr(config, "target_name_or_path", None)
    if target is not None and not isinstance(target, str):
        raise ModelCardError(
            f"`model.config.target_name_or_path` (the card's `base_model`) must be a Hub id or a path, found "
            f"{target!r}. Set it to the target's name, or to None."
        )
    if tags is not None and (not isinstance(tags, (list, tuple)) or not all(isinstance(tag, str) for tag in tags)):
        raise ModelCardError(f"`tags` must be a list of strings, found {tags!r}.")
    for name, value in (("license", license), ("repo_id", repo_id)):
        if value is not None and not isinstance(value, str):
            raise ModelCardError(f"`{name}` must be a string or None, found {value!r}.")
    # The Hub reads `base_model` as a repo id: a target loaded from a local folder is named in the text only.
    base_model = target if target and not os.path.isdir(target) else None
    card_tags = list(MODEL_CARD_TAGS) + [tag for tag in (tags or []) if tag not in MODEL_CARD_TAGS]
    training_info = _read_training(training)
    card_data = ModelCardData(
        library_name="transformers",
        base_model=base_model,
        license=license,
        datasets=_all_datasets(training_info) or None,
        tags=card_tags,
    )
    target_text = f"`{target}`" if target else "its target model"
    body = CARD_TEMPLATE.format(
        target_text=target_text,
        paper_url=PAPER_URL,
        sliding_window=config.sliding_window,
        target_layer="its last layer" if config.target_kv_layer == -1 else f"layer {config.target_kv_layer}",
        repo_id=repo_id or DEFAULT_REPO_ID,
        tokenizer_name=target or "the/target/model",
        settings_table=_settings_table(config),
        training_text=_training_text(training_info),
        results_text=_results_text(results),
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def write_model_card(
    model,
    save_directory: str | os.PathLike,
    tags: list[str] | None = None,
    results: dict | list | str | os.PathLike | None = None,
    training: dict | str | os.PathLike | None = None,
    license: str | None = None,
    repo_id: str | None = None,
) -> str:
    """Write `glide_model_card(model, tags, results, training, license, repo_id)` as `README.md` in
    `save_directory`, replacing any card there.

    Returns:
        `str`: the path of the written card.
    """
    if not isinstance(save_directory, (str, os.PathLike)):
        raise ModelCardError(f"`save_directory` must be a path, found {save_directory!r}.")
    path = os.path.join(save_directory, MODEL_CARD_NAME)
    glide_model_card(model, tags, results=results, training=training, license=license, repo_id=repo_id).save(path)
    return path


# --- draft settings --------------------------------------------------------------------------------------------------


def _settings_table(config) -> str:
    layer = config.target_kv_layer
    rows = [
        ("target", f"`{config.target_name_or_path}`" if config.target_name_or_path else "not named"),
        ("self-attention window (`sliding_window`)", f"{config.sliding_window} tokens"),
        ("target layer read (`target_kv_layer`)", f"{layer} (the last)" if layer == -1 else str(layer)),
        ("draft tokens per round (`num_draft_tokens`)", str(config.num_draft_tokens)),
        ("training lag (`max_draft_lag`)", f"1..{config.max_draft_lag}"),
        ("MLP width (`intermediate_size`)", str(config.intermediate_size)),
        ("final norm (`final_norm`)", _format_value(config.final_norm)),
        ("q/k/v biases (`attention_bias`)", _format_value(config.attention_bias)),
    ]
    draft_vocab_size = getattr(config, "draft_vocab_size", None)  # configs of older drafts lack the key
    rows.append(
        (
            "draft vocabulary (`draft_vocab_size`)",
            "the whole vocabulary"
            if draft_vocab_size is None
            else f"{draft_vocab_size} of {config.vocab_size} token ids (the engine only)",
        )
    )
    return _table(("setting", "value"), rows)


# --- training --------------------------------------------------------------------------------------------------------


def _read_training(training) -> dict:
    """`training` as `{"datasets": [...], "data": [...], "settings": {...}, "stages": [...]}`, each stage a dict
    of the same first three keys plus `name`."""
    if training is None:
        return {"datasets": [], "data": [], "settings": {}, "stages": []}
    value = _load(training, "training")
    if not isinstance(value, dict):
        raise ModelCardError(
            f"`training` must be a JSON object of training data and settings, found a {type(value).__name__}."
        )
    info = _read_training_part(value, "training")
    stages = value.get("stages") or []
    if not isinstance(stages, list) or not all(isinstance(stage, dict) for stage in stages):
        raise ModelCardError("`training['stages']` must be a list of objects, one per stage.")
    info["stages"] = []
    for index, stage in enumerate(stages):
        part = _read_training_part(stage, f"training['stages'][{index}]")
        part["name"] = str(stage.get("name") or f"Stage {index + 1}")
        info["stages"].append(part)
    return info


def _all_datasets(info: dict) -> list[str]:
    """The datasets of the whole run and of every stage, each once, for the front matter."""
    names = [*info["datasets"], *(name for stage in info["stages"] for name in stage["datasets"])]
    return list(dict.fromkeys(names))


def _read_training_part(value: dict, where: str) -> dict:
    if "glide" in value and "training" in value:  # `glide-hf train --dry-run` output
        for key in ("glide", "training"):
            if not isinstance(value[key], dict):
                raise ModelCardError(
                    f"`{where}['{key}']` must be an object (as `glide-hf train --dry-run` prints it), found "
                    f"{type(value[key]).__name__}."
                )
        value = {
            **{name: value["glide"].get(name) for name in DRY_RUN_SETTINGS["glide"]},
            **{name: value["training"].get(name) for name in DRY_RUN_SETTINGS["training"]},
            **{key: item for key, item in value.items() if key not in ("glide", "training", "resolved")},
        }
    datasets = _string_list(value.get("datasets"), f"{where}['datasets']")
    data = _string_list(value.get("data"), f"{where}['data']")
    settings = {
        key: item
        for key, item in value.items()
        if key not in ("datasets", "data", "stages", "name") and item is not None
    }
    return {"datasets": datasets, "data": data, "settings": settings}


def _training_text(info: dict) -> str:
    parts = [_training_part_text(info)] if (info["data"] or info["datasets"] or info["settings"]) else []
    for stage in info["stages"]:
        parts.append(f"### {stage['name']}\n\n{_training_part_text(stage)}")
    if not parts:
        return "Not recorded for this checkpoint."
    return "\n\n".join(part for part in parts if part)


def _training_part_text(info: dict) -> str:
    lines = []
    if info["datasets"]:
        links = ", ".join(f"[{name}](https://huggingface.co/datasets/{name})" for name in info["datasets"])
        lines.append(f"Datasets: {links}.")
    if info["data"]:
        lines.append(f"Data: {', '.join(info['data'])}.")
    if info["settings"]:
        rows = [(f"`{key}`", _format_value(item)) for key, item in info["settings"].items()]
        lines.append(_table(("setting", "value"), rows))
    return "\n\n".join(lines)


# --- results ---------------------------------------------------------------------------------------------------------


def _results_text(results) -> str:
    if results is None:
        return "Not measured for this checkpoint."
    rows, context = _read_results(results)
    columns = [(name, heading) for name, heading in RESULT_COLUMNS if any(name in row for row in rows)]
    table = _table(
        tuple(heading for _, heading in columns),
        [tuple(_format_value(row.get(name), name) if name in row else "" for name, _ in columns) for row in rows],
    )
    text = [
        table,
        "tau: tokens a sequence gains per target forward pass (the prefill included; 1.0 means no gain). Speedup: "
        "tokens per second over plain `target.generate` on the same hardware and prompts.",
    ]
    measured = [f"{name}: {_format_value(context[name])}" for name in RESULT_CONTEXT_FIELDS if name in context]
    if measured:
        text.append("Measured with " + "; ".join(measured) + ".")
    return "\n\n".join(text)


def _read_results(results) -> tuple[list[dict], dict]:
    """The rows of `results` (aliases resolved, speedup derived) and its context fields."""
    value = _load(results, "results")
    context = {}
    if isinstance(value, dict) and "results" in value:
        context = {name: value[name] for name in RESULT_CONTEXT_FIELDS if value.get(name) is not None}
        value = value["results"]
    elif isinstance(value, dict) and isinstance(value.get("summaries"), list):  # `glide-hf bench --output-json`
        for key in ("arguments", "settings"):
            if value.get(key) is not None and not isinstance(value[key], dict):
                raise ModelCardError(
                    f"`results['{key}']` must be an object (as `glide-hf bench --output-json` writes it), found "
                    f"{type(value[key]).__name__}."
                )
        for index, summary in enumerate(value["summaries"]):
            if not isinstance(summary, dict):
                raise ModelCardError(
                    f"`results['summaries']` item {index} is a {type(summary).__name__}, expected an object of "
                    "metrics."
                )
        shared = {
            "dataset": (value.get("arguments") or {}).get("prompts"),
            "max_new_tokens": (value.get("settings") or {}).get("max_new_tokens"),
        }
        context = {"device": value["device"]} if value.get("device") else {}
        value = [{**shared, **summary} for summary in value["summaries"]]
    elif isinstance(value, dict) and isinstance(value.get("metrics"), dict):
        value = value["metrics"]
    raw_rows = value if isinstance(value, list) else [value]
    rows = []
    for index, raw in enumerate(raw_rows):
        if not isinstance(raw, dict):
            raise ModelCardError(f"`results` row {index} is a {type(raw).__name__}, expected an object of metrics.")
        row = {}
        for key, item in raw.items():
            name = RESULT_ALIASES.get(key, key)
            if item is not None and name not in row and any(name == column for column, _ in RESULT_COLUMNS):
                row[name] = item
        tokens_per_second, baseline = row.get("tokens_per_second"), row.get("baseline_tokens_per_second")
        if "speedup" not in row and _is_number(tokens_per_second) and _is_number(baseline) and baseline > 0:
            row["speedup"] = tokens_per_second / baseline
        _check_row(row, index)
        if any(name in row for name in METRIC_COLUMNS):
            rows.append(row)
    if not rows:
        raise ModelCardError(
            f"`results` holds no measured value: each row needs one of {', '.join(METRIC_COLUMNS)} (or "
            "`tokens_per_target_forward` / `eval_tokens_per_target_forward` for tau)."
        )
    return rows, context


def _check_row(row: dict, index: int) -> None:
    for name, item in row.items():
        if name in TEXT_COLUMNS:
            if not isinstance(item, str):
                raise ModelCardError(f"`results` row {index}: `{name}` must be a string (a name), found {item!r}.")
        elif name == "tree_widths":
            if not isinstance(item, list) or not all(isinstance(width, int) and _is_number(width) for width in item):
                raise ModelCardError(
                    f"`results` row {index}: `tree_widths` must be a list of integers, found {item!r}."
                )
        elif not _is_number(item):
            raise ModelCardError(f"`results` row {index}: `{name}` must be a number, found {item!r}.")
        elif not math.isfinite(item):
            raise ModelCardError(f"`results` row {index}: `{name}` must be a finite number, found {item!r}.")


# --- helpers ---------------------------------------------------------------------------------------------------------


def _load(value, name: str):
    """`value` itself, or the JSON content of the file it names."""
    if not isinstance(value, (str, os.PathLike)):
        return value
    try:
        with open(value, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as error:
        raise ModelCardError(f"The `{name}` file `{value}` cannot be read: {error}.") from error
    except UnicodeDecodeError as error:
        raise ModelCardError(
            f"The `{name}` file `{value}` is not UTF-8 text ({error.reason} at byte {error.start}): expected JSON."
        ) from error
    except json.JSONDecodeError as error:
        raise ModelCardError(
            f"The `{name}` file `{value}` is not valid JSON ({error.msg} at line {error.lineno}, column "
            f"{error.colno})."
        ) from error


def _string_list(value, where: str) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(item, str) for item in values):
        raise ModelCardError(f"`{where}` must be a string or a list of strings, found {value!r}.")
    return list(values)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format_value(value, name: str | None = None) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if name in ("tokens_per_second", "baseline_tokens_per_second"):
            return f"{value:.1f}"
        if name == "speedup":
            return f"{value:.2f}x"
        return f"{value:.4g}" if name != "tau" else f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(item) for item in value)
    return str(value)


def _table(headings: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    def cells(values) -> str:
        return "| " + " | ".join(str(value).replace("|", "\\|") for value in values) + " |"

    return "\n".join([cells(headings), cells(["---"] * len(headings)), *(cells(row) for row in rows)])


__all__ = [
    "DRY_RUN_SETTINGS",
    "METRIC_COLUMNS",
    "MODEL_CARD_NAME",
    "MODEL_CARD_TAGS",
    "RESULT_COLUMNS",
    "TEXT_COLUMNS",
    "glide_model_card",
    "write_model_card",
]
