"""Convert LongSpec draft checkpoints (arXiv 2502.17421, `sail-sg/LongSpec`) into glide-hf drafts.

LongSpec publishes its drafts (`sail/longspec-*` on the Hub) as a folder with the target's Llama/Qwen2 `config.json`
and one `model.safetensors` of unprefixed tensors (`self_attn.q_proj.weight`, `mlp.up_proj.weight`, ...); its
training code writes the same tensors as a `torch.save`d state dict, `draft_model_weights.pth`, without a config.
Both hold one decoder layer whose module names glide-hf keeps, so the conversion is a prefix map (`model.layer.` +
name) plus three settings and one deletion:

- `final_norm=False`: LongSpec feeds the layer's output to the target's LM head directly;
- `attention_bias=True`: LongSpec's q/k/v projections have biases, for Llama and Qwen2 targets alike;
- `sliding_window=513` (see `LONGSPEC_SLIDING_WINDOW`);
- `cross_attn.k_proj`/`cross_attn.v_proj` are dropped: LongSpec computes them but never uses the result, since
  its cross-attention reads the target's cached keys/values as they are.

This module reads, checks and maps checkpoints, and `run_cli` is `glide-hf convert-longspec`; the draft itself is
`GlideForCausalLM`, and loading a converted draft is `GlideForCausalLM.from_pretrained`.
"""

import argparse
import dataclasses
import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging

from .configuration_glide import GlideConfig, target_shape
from .errors import CheckpointFormatError, GlideConfigError, TargetMismatchError, TargetNotFoundError
from .modeling_glide import GlideForCausalLM, check_target_model

logger = logging.get_logger(__name__)

# Where the LongSpec layer's tensors live in a `GlideForCausalLM` state dict.
LAYER_PREFIX = "model.layer."
# LongSpec's cross-attention computes k/v projections of the draft's hidden states and never reads them (its keys and
# values are the target's cache); the tensors are in its checkpoints, and a glide-hf draft has no place for them.
UNUSED_LONGSPEC_TENSORS = (
    "cross_attn.k_proj.weight",
    "cross_attn.k_proj.bias",
    "cross_attn.v_proj.weight",
    "cross_attn.v_proj.bias",
)
# LongSpec calls flash-attention with `window_size=(512, -1)`: a query sees the 512 previous keys and itself.
# glide-hf's `sliding_window=W` counts the query's own token: Transformers' sliding mask keeps `kv_idx > q_idx - W`
# (`masking_utils.sliding_window_overlay`) and its flash-attention path passes `window_size=(W - 1, W - 1)`. Worked
# example, query at position 600: LongSpec sees keys 88..600, and `W = 513` keeps `kv_idx > 600 - 513 = 87`, the same
# 513 keys.
LONGSPEC_SLIDING_WINDOW = 513
# Weight files looked for in a checkpoint folder, in this order: the Hub format, then the training code's.
WEIGHT_FILE_NAMES = ("model.safetensors", "draft_model_weights.pth", "pytorch_model.bin")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".bin")
CONFIG_FILE_NAME = "config.json"
# Fields the LongSpec format fixes: overriding them would not match the checkpoint's tensors.
FIXED_CONFIG_FIELDS = ("target_config", "final_norm", "attention_bias")
# Checkpoint config keys that must equal the target's: the draft reads the target's embedding and KV cache.
CHECKED_SHAPE_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
# Checkpoint config keys the conversion reads: the shape keys it needs, and those that may be absent or null (Llama's
# defaults then apply: as many KV heads as heads, `head_dim = hidden_size // num_attention_heads`; the target's MLP
# width and epsilon).
REQUIRED_CONFIG_FIELDS = ("hidden_size", "num_attention_heads")
OPTIONAL_INT_CONFIG_FIELDS = ("num_key_value_heads", "head_dim", "intermediate_size")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass
class LongSpecCheckpoint:
    """What `read_longspec_checkpoint` found.

    Args:
        weights_path (`Path`): the file the tensors were read from.
        tensors (`dict[str, torch.Tensor]`): the tensors under their LongSpec names, as stored.
        config (`dict`, *optional*): the parsed `config.json` beside the weights, None when there is none.
    """

    weights_path: Path
    tensors: dict[str, torch.Tensor]
    config: dict | None


@dataclasses.dataclass
class ConversionResult:
    """A converted draft and what happened to the checkpoint's tensors.

    Args:
        draft (`GlideForCausalLM`): the draft, target attached, in eval mode.
        weights_path (`Path`): the file the tensors were read from.
        dtype (`torch.dtype`): dtype of the draft's weights.
        converted (`list[str]`): LongSpec names of the tensors loaded into the draft.
        dropped (`list[str]`): LongSpec names of the unused tensors left out.
        output_dir (`str`, *optional*): where the draft was saved, None when it was not.
    """

    draft: GlideForCausalLM
    weights_path: Path
    dtype: torch.dtype
    converted: list[str]
    dropped: list[str]
    output_dir: str | None


def read_longspec_checkpoint(checkpoint: str | os.PathLike) -> LongSpecCheckpoint:
    """Read a LongSpec draft checkpoint without interpreting it.

    Args:
        checkpoint (`str` or `os.PathLike`): a folder holding `model.safetensors` (with its `config.json`) or
            `draft_model_weights.pth`; a single `.safetensors`, `.pth` or `.bin` file; or a Hub repo id such as
            `sail/longspec-QwQ-32B-Preview` when no such local path exists. A `config.json` is read only from a
            folder: LongSpec's training code writes none beside its `.pth` file.

    Returns:
        `LongSpecCheckpoint`: the tensors under their LongSpec names, and the config when there is one.
    """
    weights_path, config_path = _locate_checkpoint(checkpoint)
    tensors = _read_tensors(weights_path)
    config = _read_config(config_path) if config_path is not None else None
    return LongSpecCheckpoint(weights_path=weights_path, tensors=tensors, config=config)


def convert_longspec(
    checkpoint: str | os.PathLike,
    target: PreTrainedModel | str,
    output_dir: str | os.PathLike | None = None,
    target_kwargs: dict | None = None,
    dtype: torch.dtype | str | None = None,
    **config_overrides,
) -> GlideForCausalLM:
    """Convert a LongSpec draft checkpoint into a `GlideForCausalLM` attached to its target.

    Args:
        checkpoint (`str` or `os.PathLike`): see `read_longspec_checkpoint`.
        target (`PreTrainedModel` or `str`): the target the draft was trained for, or a Hub id / local path that
            `AutoModelForCausalLM.from_pretrained` loads with `target_kwargs`. A name is stored as the draft's
            `target_name_or_path`; for a model, its `config._name_or_path` is.
        output_dir (`str` or `os.PathLike`, *optional*): when given, the draft is saved there with `save_pretrained`.
        target_kwargs (`dict`, *optional*): keyword arguments for loading `target` when it is a name.
        dtype (`torch.dtype` or `str`, *optional*): dtype of the draft's weights. Defaults to the checkpoint's.
        config_overrides: other `GlideConfig` fields, e.g. `num_draft_tokens=4`. `sliding_window` defaults to
            `LONGSPEC_SLIDING_WINDOW`; `final_norm`, `attention_bias` and `target_config` are fixed by the format.

    Returns:
        `GlideForCausalLM`: the draft in eval mode with the target attached. The draft's own weights are on CPU;
        `draft.to(device)` moves them and the target.

    Example:

    ```python
    >>> from glide_hf.convert import convert_longspec
    >>> draft = convert_longspec("sail/longspec-QwQ-32B-Preview", "Qwen/QwQ-32B-Preview", output_dir="glide-qwq",
    ...                          target_kwargs={"dtype": "bfloat16"}, dtype="bfloat16")
    ```
    """
    return _convert(checkpoint, target, output_dir, target_kwargs, dtype, config_overrides).draft


def _convert(checkpoint, target, output_dir, target_kwargs, dtype, config_overrides: dict) -> ConversionResult:
    _check_config_overrides(config_overrides)
    dtype = _resolve_dtype(dtype)
    if target_kwargs and not isinstance(target, (str, os.PathLike)):
        raise ValueError("`target_kwargs` apply only when `target` is a name or path, not a loaded model.")
    loaded = read_longspec_checkpoint(checkpoint)  # before the target: checkpoint errors should not wait for it
    if isinstance(target, (str, os.PathLike)):
        target_name = str(target)
        target = _load_target(target_name, target_kwargs)
    else:
        target_name = target.config._name_or_path or None
    check_target_model(target)

    source = str(loaded.weights_path)
    fields = {}
    if loaded.config is not None:
        _check_checkpoint_config(loaded.config, target, source)
        fields = {key: loaded.config[key] for key in ("intermediate_size", "rms_norm_eps") if key in loaded.config}
    fields = {
        "target_name_or_path": target_name,
        "sliding_window": LONGSPEC_SLIDING_WINDOW,
        **fields,
        **config_overrides,
    }
    config = GlideConfig(target_config=target.config, final_norm=False, attention_bias=True, **fields)

    # Built on the meta device: every parameter is replaced by a checkpoint tensor below, so nothing is initialised.
    with torch.device("meta"):
        draft = GlideForCausalLM(config)
    expected = {}
    for name, parameter in draft.state_dict().items():
        assert name.startswith(LAYER_PREFIX), f"unexpected draft tensor {name}"  # final_norm=False: one layer only
        expected[name.removeprefix(LAYER_PREFIX)] = tuple(parameter.shape)
    _check_tensor_names(loaded.tensors, expected, source)
    _check_tensor_shapes(loaded.tensors, expected, target, source)
    checkpoint_dtype = _checkpoint_dtype(loaded.tensors, expected, source, required=dtype is None)
    dtype = dtype if dtype is not None else checkpoint_dtype
    state_dict = {LAYER_PREFIX + name: loaded.tensors[name].to(dtype) for name in expected}
    draft.load_state_dict(state_dict, strict=True, assign=True)
    draft.config.dtype = dtype
    draft.attach_target(target)
    draft.eval()

    converted = sorted(expected)
    dropped = sorted(name for name in UNUSED_LONGSPEC_TENSORS if name in loaded.tensors)
    logger.info(f"Converted {len(converted)} tensors from `{source}` to a GLIDE draft ({dtype}).")
    if dropped:
        logger.info(f"Dropped {len(dropped)} tensors that LongSpec computes but never uses: {', '.join(dropped)}.")
    if output_dir is not None:
        if target_name is None:
            logger.warning(
                "The target has no `config._name_or_path`, so the saved draft does not name its target: load it "
                "with `GlideForCausalLM.from_pretrained(path, target_model=target)`."
            )
        draft.save_pretrained(output_dir)
        logger.info(f"Saved the GLIDE draft to `{output_dir}`.")
    return ConversionResult(
        draft=draft,
        weights_path=loaded.weights_path,
        dtype=dtype,
        converted=converted,
        dropped=dropped,
        output_dir=None if output_dir is None else str(output_dir),
    )


def _check_config_overrides(config_overrides: dict) -> None:
    fixed = sorted(set(config_overrides) & set(FIXED_CONFIG_FIELDS))
    if fixed:
        raise GlideConfigError(
            f"{', '.join(f'`{name}`' for name in fixed)} cannot be set when converting a LongSpec draft: the "
            "format fixes them (`final_norm=False`, `attention_bias=True`, the target's config). Leave them out."
        )
    known = {field.name for field in dataclasses.fields(GlideConfig)}
    unknown = sorted(set(config_overrides) - known)
    if unknown:
        raise GlideConfigError(
            f"{', '.join(f'`{name}`' for name in unknown)} is not a `GlideConfig` field. Pass `GlideConfig` fields "
            "only, e.g. `sliding_window=513` or `num_draft_tokens=4`."
        )


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        resolved = getattr(torch, dtype, None) if dtype in DTYPE_NAMES else None
        if resolved is None:
            raise ValueError(f"`dtype` must be one of {', '.join(DTYPE_NAMES)} or a `torch.dtype`, got {dtype!r}.")
    if resolved is not None and not resolved.is_floating_point:
        raise ValueError(f"`dtype` must be a floating-point dtype such as torch.bfloat16, got {resolved}.")
    return resolved


def _load_target(name_or_path: str, target_kwargs: dict | None) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **(target_kwargs or {}))
    except OSError as error:
        raise TargetNotFoundError(
            f"The target `{name_or_path}` could not be loaded: {error}\nPass the Hub id or local folder of the model "
            "the LongSpec draft was trained for, or a loaded model."
        ) from error


def _locate_checkpoint(checkpoint: str | os.PathLike) -> tuple[Path, Path | None]:
    """The weights file of a checkpoint and the `config.json` beside it (folders only)."""
    path = Path(checkpoint)
    if not path.exists():
        if not _REPO_ID.match(str(checkpoint)):
            raise CheckpointFormatError(
                f"No LongSpec checkpoint at `{checkpoint}`: the path does not exist. Pass a folder holding "
                "`model.safetensors` or `draft_model_weights.pth`, a `.safetensors`/`.pth`/`.bin` file, or a Hub "
                "repo id such as `sail/longspec-QwQ-32B-Preview`."
            )
        path = _download(str(checkpoint))
    if path.is_dir():
        config_path = path / CONFIG_FILE_NAME
        config_path = config_path if config_path.is_file() else None
        for name in WEIGHT_FILE_NAMES:
            if (path / name).is_file():
                return path / name, config_path
        candidates = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_FILE_SUFFIXES))
        if len(candidates) == 1:
            return path / candidates[0], config_path
        if candidates:
            raise CheckpointFormatError(
                f"The folder `{path}` holds several weight files ({', '.join(candidates)}) and none of "
                f"{', '.join(WEIGHT_FILE_NAMES)}: a LongSpec draft is one file. Pass the file to convert as "
                "`checkpoint`."
            )
        found = sorted(p.name for p in path.iterdir())
        raise CheckpointFormatError(
            f"The folder `{path}` holds no LongSpec weights: expected `model.safetensors` (Hub format) or "
            f"`draft_model_weights.pth` (training output), found {', '.join(found) if found else 'nothing'}."
        )
    if path.name.endswith(WEIGHT_FILE_SUFFIXES):
        return path, None
    raise CheckpointFormatError(
        f"`{path}` is not a LongSpec checkpoint format: expected a folder, or a file ending in "
        f"{', '.join(WEIGHT_FILE_SUFFIXES)}, found a `{path.suffix or 'suffix-less'}` file."
    )


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = snapshot_download(
            repo_id, allow_patterns=[CONFIG_FILE_NAME, *(f"*{suffix}" for suffix in WEIGHT_FILE_SUFFIXES)]
        )
    except (OSError, HFValidationError) as error:
        raise CheckpointFormatError(
            f"`{repo_id}` is neither a local path nor a downloadable Hub repo ({error}). Pass a local folder or file, "
            "or a Hub repo id such as `sail/longspec-QwQ-32B-Preview`."
        ) from error
    return Path(folder)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise CheckpointFormatError(
                f"`{path}` could not be read as a safetensors file ({error}). Check that the download is complete."
            ) from error
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointFormatError(
            f"`{path}` could not be read as a state dict saved with `torch.save` ({error}). LongSpec's training code "
            "writes `draft_model_weights.pth`, a plain dict of tensors."
        ) from error
    if not isinstance(state_dict, Mapping):
        raise CheckpointFormatError(
            f"`{path}` holds a `{type(state_dict).__name__}`, not a state dict: expected a dict of tensor name to "
            "tensor, as LongSpec's training code writes to `draft_model_weights.pth`."
        )
    not_tensors = sorted(str(name) for name, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointFormatError(
            f"`{path}` is not a flat state dict: the entries {', '.join(not_tensors)} are not tensors. Extract the "
            "draft's state dict (e.g. `checkpoint['state_dict']`) and save it alone with `torch.save`."
        )
    return dict(state_dict)


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointFormatError(f"`{path}` is not a readable JSON config ({error}).") from error
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"`{path}` holds a JSON `{type(config).__name__}`, expected an object.")
    return config


def _check_checkpoint_config(config: dict, target: PreTrainedModel, source: str) -> None:
    """Raise unless the checkpoint's config (a copy of its target's Llama/Qwen2 config) has the target's shape."""
    if config.get("model_type") == GlideConfig.model_type:
        raise CheckpointFormatError(
            f"The checkpoint `{source}` is already a glide-hf draft (`model_type='glide'`): load it with "
            "`GlideForCausalLM.from_pretrained(path, target_model=target)` instead of converting it."
        )
    _check_config_values(config, source)
    heads = config["num_attention_heads"]
    kv_heads, head_dim = config.get("num_key_value_heads"), config.get("head_dim")
    found = {
        "hidden_size": config["hidden_size"],
        "num_attention_heads": heads,
        "num_key_value_heads": heads if kv_heads is None else kv_heads,
        "head_dim": config["hidden_size"] // heads if head_dim is None else head_dim,
    }
    expected = target_shape(target.config)
    for name in CHECKED_SHAPE_FIELDS:
        if found[name] != expected[name]:
            raise TargetMismatchError(
                f"The LongSpec checkpoint's config has `{name}={found[name]}`, but the target "
                f"`{target.config._name_or_path or type(target).__name__}` has `{name}={expected[name]}`. Convert "
                "the draft with the target it was trained for (named on its model card)."
            )
    if config.get("vocab_size") not in (None, expected["vocab_size"]):
        logger.warning(
            f"The LongSpec checkpoint's config has `vocab_size={config['vocab_size']}`, the target "
            f"`vocab_size={expected['vocab_size']}`: the draft reuses the target's embedding and LM head, so check "
            "that this is the target the draft was trained for."
        )


def _check_config_values(config: dict, source: str) -> None:
    """Raise `CheckpointFormatError` for a config key the conversion reads that is missing or not a usable value
    (before any arithmetic on it: `num_attention_heads=0` would divide by zero)."""
    missing = [name for name in REQUIRED_CONFIG_FIELDS if config.get(name) is None]
    if missing:
        raise CheckpointFormatError(
            f"The `config.json` beside `{source}` has no integer {', '.join(f'`{name}`' for name in missing)}: "
            "expected the Llama/Qwen2 config of the draft's target, as LongSpec saves it. Fix or remove the file "
            "to convert with the target's shape."
        )
    for name in (*REQUIRED_CONFIG_FIELDS, *OPTIONAL_INT_CONFIG_FIELDS):
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointFormatError(
                f"The `config.json` beside `{source}` has `{name}={value!r}`: expected a positive integer (the "
                "target's value, as LongSpec saves it). Fix the file, or remove it to convert with the target's shape."
            )
    eps = config.get("rms_norm_eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0):
        raise CheckpointFormatError(
            f"The `config.json` beside `{source}` has `rms_norm_eps={eps!r}`: expected a positive number (the "
            "target's value, as LongSpec saves it). Fix the file, or remove it to convert with the target's shape."
        )


def _check_tensor_names(tensors: dict, expected: dict, source: str) -> None:
    names = set(tensors)
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected) - set(UNUSED_LONGSPEC_TENSORS))
    if missing:
        found = f" It also holds tensors this format does not have: {', '.join(unexpected)}." if unexpected else ""
        raise CheckpointFormatError(
            f"The LongSpec checkpoint `{source}` lacks {len(missing)} tensors of the draft layer: "
            f"{', '.join(missing)}.{found}{_prefix_hint(unexpected, expected)} Expected LongSpec's unprefixed "
            "names, e.g. `self_attn.q_proj.weight`."
        )
    if unexpected:
        raise CheckpointFormatError(
            f"The LongSpec checkpoint `{source}` holds {len(unexpected)} tensors a LongSpec draft layer does not "
            f"have: {', '.join(unexpected)}. Expected exactly: {', '.join(sorted(expected))}, plus the unused "
            f"{', '.join(UNUSED_LONGSPEC_TENSORS)}. Remove them, or check that this is a LongSpec draft."
        )


def _prefix_hint(unexpected: list[str], expected: dict) -> str:
    """A hint when every unexpected name is an expected name under one common prefix (e.g. `draft_model.`)."""
    known = (*expected, *UNUSED_LONGSPEC_TENSORS)
    prefixes = set()
    for name in unexpected:
        matches = [name[: -len(known_name)] for known_name in known if name.endswith(f".{known_name}")]
        if not matches:
            return ""
        prefixes.add(min(matches, key=len))
    if len(prefixes) != 1:
        return ""
    return f" Its names carry the prefix `{prefixes.pop()}`: strip it from every key and save the state dict again."


def _check_tensor_shapes(tensors: dict, expected: dict, target: PreTrainedModel, source: str) -> None:
    wrong = [
        f"`{name}`: expected {list(shape)}, found {list(tensors[name].shape)}"
        for name, shape in expected.items()
        if tuple(tensors[name].shape) != shape
    ]
    if wrong:
        target_name = target.config._name_or_path or type(target).__name__
        raise TargetMismatchError(
            f"The LongSpec checkpoint `{source}` does not fit the target `{target_name}` (shapes from its config and "
            f"the draft's `intermediate_size`): {'; '.join(wrong)}. Convert the draft with the target it was trained "
            "for (named on its model card)."
        )


def _checkpoint_dtype(tensors: dict, expected: dict, source: str, required: bool) -> torch.dtype | None:
    """The one floating-point dtype of the checkpoint's tensors; None for mixed dtypes unless `required`."""
    not_float = sorted(name for name in expected if not tensors[name].is_floating_point())
    if not_float:
        raise CheckpointFormatError(
            f"The LongSpec checkpoint `{source}` has non-floating-point tensors: "
            f"{', '.join(f'{name} ({tensors[name].dtype})' for name in not_float)}. Expected float32, bfloat16 or "
            "float16 weights."
        )
    dtypes = sorted({str(tensors[name].dtype) for name in expected})
    if len(dtypes) > 1:
        if not required:
            return None
        raise CheckpointFormatError(
            f"The LongSpec checkpoint `{source}` mixes dtypes ({', '.join(dtypes)}), so the draft's dtype is not "
            "defined by it. Pass `dtype=` (`--dtype` on the command line)."
        )
    return tensors[next(iter(expected))].dtype


def run_cli(argv: list[str], prog: str) -> int:
    """`glide-hf convert-longspec`: convert a LongSpec draft checkpoint and save it as a glide-hf draft.

    Args:
        argv (`list[str]`): the flags after the subcommand.
        prog (`str`): the program name for help and error messages.

    Returns:
        `int`: the exit status, 0 on success.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a LongSpec draft (a `sail/longspec-*` folder or Hub repo, or the training code's "
        "`draft_model_weights.pth`) into a glide-hf draft folder.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="LongSpec folder, .safetensors/.pth/.bin file, or Hub repo id."
    )
    parser.add_argument(
        "--target", required=True, help="Hub id or local folder of the target model; stored in the draft's config."
    )
    parser.add_argument("--output", required=True, help="Folder to write the glide-hf draft to.")
    parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, default=None, help="Dtype of the saved draft (default: the checkpoint's)."
    )
    args = parser.parse_args(argv)
    output = Path(args.output).resolve()
    checkpoint = Path(args.checkpoint)
    if checkpoint.exists():
        checkpoint_folder = checkpoint.resolve() if checkpoint.is_dir() else checkpoint.resolve().parent
        if output == checkpoint_folder:
            parser.error(
                f"--output {args.output} is the folder of --checkpoint {args.checkpoint}: saving there would "
                "overwrite the LongSpec files. Choose another output folder."
            )
    if output.is_file():
        parser.error(f"--output {args.output} is a file; pass a folder (it is created if missing).")
    if Path(args.target).is_dir() and Path(args.target).resolve() == output:
        parser.error(f"--output {args.output} is the --target folder: saving there would overwrite the target.")
    if output.is_dir() and any((output / name).exists() for name in ("config.json", "model.safetensors")):
        parser.error(
            f"--output {args.output} already holds a model (config.json or model.safetensors): choose an empty or "
            "new folder, so that nothing saved there is overwritten."
        )

    # The conversion needs the target's config and module layout only, so its weights go to the meta device as they
    # are read: converting a one-layer draft never holds a 32B target in memory.
    result = _convert(args.checkpoint, args.target, args.output, {"device_map": "meta"}, args.dtype, {})
    dropped = f" ({', '.join(result.dropped)})" if result.dropped else ""
    dtype_name = str(result.dtype).removeprefix("torch.")
    print(
        f"Converted {len(result.converted)} tensors from {result.weights_path} ({dtype_name}); "
        f"dropped {len(result.dropped)} unused{dropped}; saved to {result.output_dir}"
    )
    return 0


__all__ = [
    "LONGSPEC_SLIDING_WINDOW",
    "UNUSED_LONGSPEC_TENSORS",
    "ConversionResult",
    "LongSpecCheckpoint",
    "convert_longspec",
    "read_longspec_checkpoint",
    "run_cli",
]
