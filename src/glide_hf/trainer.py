"""Training a GLIDE draft: `glide-hf train` and `train_glide`, a stock `transformers.Trainer` with LongSpec's recipe.

`train_glide(glide_args, training_args)` loads the target (frozen; bf16 on CUDA, fp32 on CPU by default), builds a
new draft (`GlideForCausalLM.from_target`) or continues an earlier one (`init_draft`: multi-stage training),
prepares the data (`data.py`: formats, masking, packing or padding, Anchor-Offset positions), trains with
`GlideTrainer`, a stock `Trainer` whose checkpoints are written atomically (fp32 draft weights, `bf16=True` for
autocast; resume, `report_to` and progress bars are the Trainer's), and saves the final draft, its tokenizer and a
model card to `output_dir`. When a held-out split exists, every evaluation also measures acceptance: tokens per
target forward under greedy stock assisted decoding, logged as `eval_tokens_per_target_forward` beside
`eval_loss`.

`run_cli(argv, prog)` is the `glide-hf train` command: flags are the fields of `GlideTrainingArguments` and
`transformers.TrainingArguments` (`--max_steps` or `--max-steps`), optionally read from a YAML or JSON file given
first (`glide-hf train stage1.yaml --max_steps 10`; later flags override the file).

What this file leaves to others: the model and its loss (`modeling_glide.py`, `loss.py`), data handling
(`data.py`), subcommand dispatch (`cli.py`).
"""

import dataclasses
import json
import logging as pylogging
import os
import re
import shutil
import types
import zipfile
from dataclasses import dataclass, field
from typing import Literal, Union, get_args, get_origin, get_type_hints

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    HfArgumentParser,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer import CONFIG_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from transformers.utils import (
    SAFE_WEIGHTS_NAME,
    is_torch_bf16_gpu_available,
    is_torch_tf32_available,
    is_torch_xla_available,
    logging,
)

from .bench import count_forward_calls
from .cli import cli_logging
from .data import AnchorOffset, GlideDataCollator, PreparedData, prepare_data, resolve_sources
from .errors import CheckpointFormatError, GlideConfigError, TargetMismatchError, TargetNotFoundError
from .model_card import write_model_card
from .modeling_glide import GlideForCausalLM, _target_reference

logger = logging.get_logger(__name__)

TARGET_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Draft config fields settable from the command line. Architecture fields shape what the weights compute, so a
# continued draft (`init_draft`) must keep its own; training fields may change between stages.
DRAFT_ARCHITECTURE_FIELDS = ("sliding_window", "target_kv_layer")
DRAFT_TRAINING_FIELDS = ("max_draft_lag", "num_draft_tokens", "loss_implementation")
ACCEPTANCE_METRIC = "eval_tokens_per_target_forward"
CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")
# A checkpoint is written under `checkpoint-N.tmp` and renamed to `checkpoint-N` once complete (`GlideTrainer`);
# one saved again at the same step is moved to `checkpoint-N.replaced` until the new one has taken its name.
CHECKPOINT_STAGING_SUFFIX = ".tmp"
CHECKPOINT_REPLACED_SUFFIX = ".replaced"
# What each file that resuming needs holds, for the error that names a missing one.
RESUME_FILE_CONTENTS = {
    TRAINER_STATE_NAME: "the trainer state",
    SCHEDULER_NAME: "the learning-rate schedule",
    OPTIMIZER_NAME: "the optimizer state",
}
# Checkpoint files written with `torch.save` (zip archives).
TORCH_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin")
MODEL_CARD_TAGS = ["glide-hf-train"]


@dataclass
class GlideTrainingArguments:
    """What to train and on which data: the target, the data, LongSpec's recipe and the draft's settings. Used with
    `transformers.TrainingArguments` (optimizer, schedule, batch size, precision, checkpoints, logging)."""

    target: str = field(metadata={"help": "Hub id or local path of the target model (frozen while the draft trains)."})
    data: list[str] = field(
        metadata={
            "help": "Training data: JSONL, JSON or Parquet files, glob patterns, or folders written by "
            "`datasets`' save_to_disk."
        }
    )
    data_format: Literal["auto", "text", "chat", "source_target"] = field(
        default="auto",
        metadata={
            "help": "Record format: `text` ({'text'}), `chat` ({'messages': [{role, content}]}, loss on assistant "
            "turns), `source_target` ({'source', 'target'}, loss on target), or `auto` (from the fields)."
        },
    )
    eval_data: list[str] | None = field(
        default=None, metadata={"help": "Held-out data files (same format), instead of `eval_split_fraction`."}
    )
    eval_split_fraction: float = field(
        default=0.0, metadata={"help": "Fraction of the samples held out for evaluation (at least one sample if > 0)."}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer to use; default: the target's."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per sample (padding) or per row (packing)."})
    overflow: Literal["truncate", "drop"] = field(
        default="truncate", metadata={"help": "What to do with samples longer than `max_length` (counted, logged)."}
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Concatenate samples (EOS-separated) into rows of `max_length` tokens, one attention stream per "
            "row. Default: one sample per row, right-padded."
        },
    )
    skip_bad_lines: bool = field(
        default=False, metadata={"help": "Skip malformed records (counted and logged per file) instead of failing."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization and packing (`datasets.map`)."}
    )
    data_cache_dir: str | None = field(
        default=None, metadata={"help": "Where `datasets` caches the processed data; default: its own cache."}
    )
    anchor_offset: bool = field(
        default=False,
        metadata={
            "help": "LongSpec's Anchor-Offset positions: keep `num_anchors` first positions, shift the rest by a "
            "random offset per row, so that short rows train long-context positions."
        },
    )
    num_anchors: int = field(default=4, metadata={"help": "Anchor-Offset: leading positions kept unshifted."})
    max_position_offset: int | None = field(
        default=None,
        metadata={
            "help": "Anchor-Offset: largest offset. Default: the target's `max_position_embeddings - max_length`."
        },
    )
    init_draft: str | None = field(
        default=None,
        metadata={
            "help": "Continue from this draft (a glide-hf checkpoint, e.g. the previous stage or a converted "
            "LongSpec draft) instead of a new one; its target shape must match `target`."
        },
    )
    sliding_window: int | None = field(
        default=None, metadata={"help": "New draft: tokens its self-attention sees (LongSpec's W). Default: 512."}
    )
    target_kv_layer: int | None = field(
        default=None, metadata={"help": "New draft: target layer whose KV cache it reads. Default: -1 (the last)."}
    )
    max_draft_lag: int | None = field(
        default=None,
        metadata={
            "help": "Training lag drawn in 1..max_draft_lag (LongSpec's noisy training); at least the draft steps "
            "per round. Default: the draft config's (5)."
        },
    )
    num_draft_tokens: int | None = field(
        default=None, metadata={"help": "Tokens drafted per round by assisted decoding (saved with the draft)."}
    )
    loss_implementation: Literal["auto", "liger", "chunked", "plain"] | None = field(
        default=None, metadata={"help": "Cross-entropy implementation. Default: the draft config's (`auto`)."}
    )
    target_dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata={"help": "Dtype of the frozen target. `auto`: bfloat16 on CUDA (float16 with `fp16`), else float32."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention backend of target and draft (`sdpa`, `flash_attention_2`, ...)."}
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Resume from the last checkpoint in `output_dir` if there is one (else start afresh)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an `output_dir` that already holds one (its checkpoints or a saved draft), "
            "replacing it. Without it, such a folder is refused unless resuming."
        },
    )
    acceptance_eval_prompts: int = field(
        default=8,
        metadata={
            "help": "Held-out prompts decoded at each evaluation to measure tokens per target forward (0: off)."
        },
    )
    acceptance_eval_max_new_tokens: int = field(
        default=64, metadata={"help": "Tokens generated per prompt by the acceptance evaluation."}
    )
    acceptance_eval_prompt_length: int = field(
        default=256, metadata={"help": "Longest prompt (last tokens kept) of the acceptance evaluation."}
    )

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.eval_data, str):
            self.eval_data = [self.eval_data]
        # The command line checks these choices itself; from Python, a typo would otherwise fail late (after the
        # target loads) or deep inside the data code. The annotations, not `dataclasses.fields(...).type`, which
        # `HfArgumentParser` rewrites in place (`X | None` becomes `X`).
        for name, annotation in get_type_hints(type(self)).items():
            choices = _literal_choices(annotation)
            value = getattr(self, name)
            if choices and value not in choices:
                allowed = ", ".join(repr(choice) for choice in choices if choice is not None)
                optional = " (or None)" if None in choices else ""
                raise GlideConfigError(f"`{name}` must be one of {allowed}{optional}, got {value!r}.")
        if not self.data:
            raise GlideConfigError("`data` is empty: pass one or more data files.")
        if self.max_length < 2:
            raise GlideConfigError(f"`max_length` must be at least 2, got {self.max_length}.")
        if not 0.0 <= self.eval_split_fraction < 1.0:
            raise GlideConfigError(f"`eval_split_fraction` must be in [0, 1), got {self.eval_split_fraction}.")
        if self.eval_data and self.eval_split_fraction:
            raise GlideConfigError(
                f"Give `eval_data` or `eval_split_fraction`, not both (got `eval_data={self.eval_data}` and "
                f"`eval_split_fraction={self.eval_split_fraction}`)."
            )
        if self.num_anchors < 0:
            raise GlideConfigError(f"`num_anchors` must be >= 0, got {self.num_anchors}.")
        if self.max_position_offset is not None and self.max_position_offset < 0:
            raise GlideConfigError(f"`max_position_offset` must be >= 0, got {self.max_position_offset}.")
        if self.acceptance_eval_prompts < 0:
            raise GlideConfigError(f"`acceptance_eval_prompts` must be >= 0, got {self.acceptance_eval_prompts}.")
        for name in ("acceptance_eval_prompt_length", "acceptance_eval_max_new_tokens"):
            if getattr(self, name) < 1:
                raise GlideConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}.")


def _literal_choices(annotation) -> tuple:
    """The values a `Literal[...]` field annotation allows (None included for `Literal[...] | None`), or `()` for
    any other annotation."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        parts = get_args(annotation)
        choices = tuple(choice for part in parts for choice in _literal_choices(part))
        if choices and type(None) in parts:
            return (*choices, None)
        return choices
    return ()


@dataclass
class GlideCliArguments:
    """Flags of the `glide-hf train` command itself."""

    dry_run: bool = field(default=False, metadata={"help": "Print the resolved configuration as JSON and exit."})
    output_json: str | None = field(
        default=None, metadata={"help": "Write the final metrics (train and eval) to this JSON file."}
    )
    # Set by `parse_train_args`, not a flag: with `dry_run`, the precision flags this machine cannot run, each with
    # the hardware it needs (checked with them off; see `_training_arguments_here`).
    unsupported_here: dict[str, str] = field(default_factory=dict, init=False)


def _option(name: str, value=None) -> str:
    """A setting as an error message names it, for both ways of giving it: the `glide-hf train` flag and the
    `GlideTrainingArguments` / `TrainingArguments` field. `_option("resume", True)` is "`--resume` (`resume=True`)",
    `_option("output_dir")` is "`--output-dir` (`output_dir`)"."""
    flag = "--" + name.replace("_", "-")
    if value is None:
        return f"`{flag}` (`{name}`)"
    if value is True:
        return f"`{flag}` (`{name}=True`)"
    return f"`{flag} {value}` (`{name}={value!r}`)"


# --- building the pieces ---------------------------------------------------------------------------------------------


def resolve_target_dtype(
    glide_args: GlideTrainingArguments, training_args: TrainingArguments, device_type: str | None = None
) -> torch.dtype:
    """`target_dtype`, with `auto` resolved: bfloat16 on CUDA (float16 when training with `fp16`), else float32.
    `device_type` is the device to resolve it for (default: `training_args.device`'s)."""
    if glide_args.target_dtype != "auto":
        return TARGET_DTYPES[glide_args.target_dtype]
    if (device_type or training_args.device.type) == "cuda":
        return torch.float16 if training_args.fp16 else torch.bfloat16
    return torch.float32


def load_target(glide_args: GlideTrainingArguments, training_args: TrainingArguments) -> PreTrainedModel:
    """The frozen target in `resolve_target_dtype` (placed on its device later, by Trainer)."""
    target_kwargs = {"dtype": resolve_target_dtype(glide_args, training_args)}
    if glide_args.attn_implementation is not None:
        target_kwargs["attn_implementation"] = glide_args.attn_implementation
    try:
        target = AutoModelForCausalLM.from_pretrained(glide_args.target, **target_kwargs)
    except OSError as error:
        raise TargetNotFoundError(f"The target `{glide_args.target}` could not be loaded: {error}") from error
    except (ValueError, ImportError) as error:
        if glide_args.attn_implementation is None:
            raise
        raise GlideConfigError(
            f"{_option('attn_implementation', glide_args.attn_implementation)} cannot load the target: {error}"
        ) from error
    return target.eval()


def build_draft(glide_args: GlideTrainingArguments, target: PreTrainedModel) -> GlideForCausalLM:
    """A new fp32 draft for `target`, or the `init_draft` checkpoint in fp32 attached to it.

    Raises:
        `TargetMismatchError` when `init_draft` was built for a target of another shape; `GlideConfigError` when an
        architecture field (`sliding_window`, `target_kv_layer`) contradicts the `init_draft` checkpoint.
    """
    given = {
        name: getattr(glide_args, name)
        for name in DRAFT_ARCHITECTURE_FIELDS + DRAFT_TRAINING_FIELDS
        if getattr(glide_args, name) is not None
    }
    # The target was loaded with `attn_implementation` already; this sets the draft's own.
    backend = {} if glide_args.attn_implementation is None else {"attn_implementation": glide_args.attn_implementation}
    if glide_args.init_draft is None:
        draft = GlideForCausalLM.from_target(target, dtype=torch.float32, **given, **backend)
        logger.info(f"Built a new GLIDE draft for `{glide_args.target}`.")
    else:
        try:
            draft = GlideForCausalLM.from_pretrained(
                glide_args.init_draft, target_model=target, dtype=torch.float32, **backend
            )
        except TargetMismatchError as error:
            raise TargetMismatchError(
                f"`init_draft` {glide_args.init_draft} was trained for a target of another shape than "
                f"`{glide_args.target}`: {error}"
            ) from error
        config = draft.config
        num_layers = config.target_config.num_hidden_layers
        for name in DRAFT_ARCHITECTURE_FIELDS:
            if name not in given:
                continue
            value, saved = given[name], getattr(config, name)
            same = value % num_layers == saved % num_layers if name == "target_kv_layer" else value == saved
            if not same:
                raise GlideConfigError(
                    f"`{name}={value}` contradicts the `init_draft` checkpoint, which has `{name}={saved}`: a "
                    f"continued draft keeps its architecture. Drop `{name}` or start a new draft."
                )
        for name in DRAFT_TRAINING_FIELDS:
            if name in given:
                setattr(config, name, given[name])
        config.check_fields()
        if "num_draft_tokens" in given:
            draft.generation_config.num_assistant_tokens = given["num_draft_tokens"]
        # The saved draft names the target it was trained with last.
        config.target_name_or_path = _target_reference(glide_args.target)
        logger.info(f"Continuing the GLIDE draft of `{glide_args.init_draft}`.")
    return draft


def load_tokenizer(glide_args: GlideTrainingArguments):
    """The tokenizer of `tokenizer` or of the target; a missing pad token is set to the EOS token (padding is
    masked, so the two never mix)."""
    tokenizer = AutoTokenizer.from_pretrained(glide_args.tokenizer or glide_args.target)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizer_fits_target(glide_args: GlideTrainingArguments, tokenizer, target: PreTrainedModel) -> None:
    """Raise `GlideConfigError` when the tokenizer has more tokens (added and special ones included) than the
    target's embedding has rows: the ids past them cannot be looked up. Fewer is common and fine (embeddings padded to
    a multiple of 64 or 128, as Qwen2.5's 151,665 tokens in 152,064 rows)."""
    num_tokens = len(tokenizer)
    vocab_size = target.get_input_embeddings().num_embeddings
    if num_tokens <= vocab_size:
        return
    if glide_args.tokenizer is not None:
        source = f"The tokenizer `{glide_args.tokenizer}`"
        remedy = f"Pass the target's own tokenizer (or drop {_option('tokenizer')} to load it from the target)."
    else:
        source = f"The tokenizer of the target `{glide_args.target}`"
        remedy = (
            "It holds tokens added after the target was trained: pass the original tokenizer with "
            f"{_option('tokenizer')}."
        )
    raise GlideConfigError(
        f"{source} has {num_tokens} tokens (special tokens included), more than the target's embedding has rows "
        f"(`vocab_size={vocab_size}`): token ids {vocab_size} and above cannot be looked up. {remedy}"
    )


def align_special_tokens(draft: GlideForCausalLM, tokenizer, target: PreTrainedModel) -> None:
    """Give the draft's config and generation config the tokenizer's special tokens (the target's EOS tokens kept
    too), as Trainer would otherwise do with a warning on every run: a new draft's config has none of its own."""
    for name in ("bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name)
        if value is not None:
            setattr(draft.config, name, value)
            setattr(draft.generation_config, name, value)
    eos = tokenizer.eos_token_id
    if eos is None:
        return
    draft.config.eos_token_id = eos
    target_eos = target.generation_config.eos_token_id
    target_eos = target_eos if isinstance(target_eos, list) else [target_eos]
    draft.generation_config.eos_token_id = [eos, *(token for token in target_eos if token not in (None, eos))]


def build_collator(
    glide_args: GlideTrainingArguments, training_args: TrainingArguments, tokenizer, target: PreTrainedModel
) -> GlideDataCollator:
    """The batch collator, with Anchor-Offset positions when `anchor_offset` is on."""
    anchor_offset = None
    if glide_args.anchor_offset:
        context = getattr(target.config, "max_position_embeddings", None)
        max_offset = glide_args.max_position_offset
        if max_offset is None:
            if context is None:
                raise GlideConfigError(
                    "The target's config has no `max_position_embeddings`: set `max_position_offset` for "
                    "Anchor-Offset positions."
                )
            max_offset = max(context - glide_args.max_length, 0)
        elif context is not None and max_offset + glide_args.max_length > context:
            logger.warning(
                f"`max_position_offset={max_offset}` plus `max_length={glide_args.max_length}` exceeds the target's "
                f"`max_position_embeddings={context}`: some training positions lie beyond its context length."
            )
        anchor_offset = AnchorOffset(num_anchors=glide_args.num_anchors, max_offset=max_offset)
        logger.info(f"Anchor-Offset positions: {glide_args.num_anchors} anchors, offsets in [0, {max_offset}].")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return GlideDataCollator(pad_token_id=pad_token_id, anchor_offset=anchor_offset, seed=training_args.seed)


def check_data_paths(glide_args: GlideTrainingArguments) -> None:
    """Raise `DataNotFoundError` or `DataFormatError` when a `data` or `eval_data` path does not exist, a glob
    matches nothing, a file has an unsupported type or a folder is not a saved dataset. Reading the records needs
    the tokenizer and comes after the target has loaded (minutes for a large one): these mistakes are found from the
    paths alone, before it."""
    resolve_sources(glide_args.data)
    if glide_args.eval_data:
        resolve_sources(glide_args.eval_data)


def build_data(glide_args: GlideTrainingArguments, training_args: TrainingArguments, tokenizer) -> PreparedData:
    """`data.prepare_data` with the run's settings; rank 0 first, the others then read its cache."""
    with training_args.main_process_first(desc="data preparation"):
        return prepare_data(
            glide_args.data,
            tokenizer,
            data_format=glide_args.data_format,
            max_length=glide_args.max_length,
            overflow=glide_args.overflow,
            packing=glide_args.packing,
            skip_bad_lines=glide_args.skip_bad_lines,
            eval_paths=glide_args.eval_data,
            eval_split_fraction=glide_args.eval_split_fraction,
            num_eval_prompts=glide_args.acceptance_eval_prompts,
            eval_prompt_length=glide_args.acceptance_eval_prompt_length,
            seed=training_args.seed,
            num_proc=glide_args.preprocessing_num_workers,
            cache_dir=glide_args.data_cache_dir,
        )


# --- acceptance evaluation -------------------------------------------------------------------------------------------


@torch.no_grad()
def tokens_per_target_forward(
    draft: GlideForCausalLM, prompts: list[torch.LongTensor], max_new_tokens: int, pad_token_id: int | None = None
) -> float:
    """Mean tokens generated per target forward pass under greedy stock assisted decoding
    (`target.generate(ids, assistant_model=draft, do_sample=False)`, one prompt at a time).

    Plain decoding scores 1.0; every accepted draft token adds to it. The prefill forward is counted, so short
    generations score a little lower than long ones. The draft's training mode is restored afterwards.

    Args:
        draft (`GlideForCausalLM`): the draft, with its target attached.
        prompts (`list[torch.LongTensor]`): 1-D token ids.
        max_new_tokens (`int`): tokens generated per prompt (fewer when the target emits EOS).
        pad_token_id (`int`, *optional*): passed to `generate`.

    Returns:
        `float`: generated tokens over target forward calls.
    """
    target = draft.target
    generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=target.generation_config.eos_token_id,
        pad_token_id=pad_token_id,
    )
    was_training = draft.training
    draft.eval()
    new_tokens = 0
    try:
        with count_forward_calls(target) as counter:
            for prompt in prompts:
                input_ids = prompt[None].to(target.device)
                output = target.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=generation_config,
                    assistant_model=draft,
                )
                new_tokens += output.shape[1] - input_ids.shape[1]
    finally:
        draft.train(was_training)
    return new_tokens / max(counter.count, 1)


class AcceptanceEvalCallback(TrainerCallback):
    """At every evaluation, measures `tokens_per_target_forward` on held-out prompts, adds it to the evaluation's
    metrics as `eval_tokens_per_target_forward` (so `metric_for_best_model` can use it) and logs it through the
    trainer (console, `report_to`, `log_history`) at the same step as `eval_loss`.

    Every process decodes the same prompts (greedy, so they agree); only the main process's log is reported.
    Skipped, with a warning, when the draft's weights are sharded (FSDP, DeepSpeed ZeRO-3): a single process cannot
    run them.
    """

    def __init__(self, trainer: Trainer, prompts: list[torch.LongTensor], max_new_tokens: int, pad_token_id=None):
        self.trainer = trainer
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.pad_token_id = pad_token_id

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.prompts or self.max_new_tokens == 0:
            return
        if _weights_are_sharded(args):
            logger.warning_once(
                "Skipping the acceptance evaluation: the draft's weights are sharded (FSDP or DeepSpeed ZeRO-3)."
            )
            return
        value = tokens_per_target_forward(self.trainer.model, self.prompts, self.max_new_tokens, self.pad_token_id)
        if metrics is not None:
            metrics[ACCEPTANCE_METRIC] = value
        self.trainer.log({ACCEPTANCE_METRIC: value})


def _weights_are_sharded(args: TrainingArguments) -> bool:
    # `accelerate launch` with an FSDP config leaves `args.fsdp` empty; its environment variable says so instead.
    if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return True
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


class _CollatorEpochCallback(TrainerCallback):
    """Tells the collator which epoch starts, so that Anchor-Offset draws differ between epochs."""

    def __init__(self, collator: GlideDataCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        # `state.epoch` is fractional after a resume in the middle of an epoch: its integer part is the epoch.
        self.collator.set_epoch(int(state.epoch or 0))


# --- checkpoints -----------------------------------------------------------------------------------------------------


class GlideTrainer(Trainer):
    """A `transformers.Trainer` whose checkpoints appear whole or not at all, and hold the draft alone.

    Trainer (5.24) writes `checkpoint-N` file by file: weights, optimizer, scheduler, RNG states, `trainer_state.json`.
    A run killed in between (preemption, out of memory, Ctrl-C) leaves a folder with that name but without, say, its
    optimizer or RNG state, and `get_last_checkpoint` (so `--resume`) picks it: the resumed run then fails or, worse,
    silently restarts the optimizer. Here every process writes into `checkpoint-N.tmp/checkpoint-N`; once all of them
    are done (barrier), the saving process moves the finished folder to `checkpoint-N` with one `os.replace`, atomic
    within a file system. A crash therefore leaves only a `checkpoint-N.tmp` folder, which `get_last_checkpoint`
    ignores (it matches `checkpoint-<digits>` exactly) and the next checkpoint save removes.

    A checkpoint saved again at the same step (a run resumed from an earlier checkpoint) is renamed to
    `checkpoint-N.replaced` before the new one takes its name, and removed only then. A crash between the two renames
    leaves the old one there, which `_recover_interrupted_saves` renames back (at the next save, and when
    `train_glide` starts); a crash after them leaves it beside the new one, which it removes.

    The guarantee covers a killed process, not the loss of the host's page cache (files are not fsync'ed). With
    several nodes, `output_dir` is either on a file system that all nodes share (`save_on_each_node` off, its
    default: one process renames) or on each node's own disk with `save_on_each_node=True` (one process per node).

    Under FSDP or DeepSpeed (without PEFT), `save_model`, `_save_optimizer_and_scheduler`, `_load_from_checkpoint`
    and `_load_best_model` save and load the draft's weights and optimizer state alone: the frozen target, sharded
    with it, is never written to a checkpoint.
    """

    # Set only while `_save_checkpoint` runs: the folder that Trainer's own checkpoint code takes as `output_dir`.
    _checkpoint_staging_dir: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(self.accelerator.state.fsdp_plugin.state_dict_type):
            raise GlideConfigError(
                f"FSDP with `fsdp_state_dict_type: {self.accelerator.state.fsdp_plugin.state_dict_type}`: GLIDE "
                "checkpoints and the final output hold the draft's weights as a full state dict (`model.safetensors`"
                ", without the frozen target). Set `fsdp_state_dict_type: FULL_STATE_DICT` in the accelerate config "
                "(examples/accelerate/fsdp.yaml does)."
            )

    def _get_output_dir(self, trial) -> str:
        # Trainer's `_save_checkpoint` writes to `_get_output_dir(trial)/checkpoint-N` and reads nothing else there
        # but the best checkpoint, fixed up below; pointing it at the staging folder makes it write there.
        if self._checkpoint_staging_dir is not None:
            return self._checkpoint_staging_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        checkpoint_dir = os.path.join(run_dir, name)
        staging_dir = checkpoint_dir + CHECKPOINT_STAGING_SUFFIX
        staged_checkpoint_dir = os.path.join(staging_dir, name)
        if self.args.should_save:
            _recover_interrupted_saves(run_dir)
        self.accelerator.wait_for_everyone()  # no process writes into a folder that is being removed
        self._checkpoint_staging_dir = staging_dir
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging_dir = None
        self.accelerator.wait_for_everyone()  # every process's files (RNG states, FSDP/DeepSpeed shards) are written
        best_is_this_one = self.state.best_model_checkpoint == staged_checkpoint_dir
        if best_is_this_one:
            # This checkpoint is the best so far, and Trainer recorded its staging path (on every process, all of
            # which load it with `load_best_model_at_end`).
            self.state.best_model_checkpoint = checkpoint_dir
        if self.args.should_save:
            if best_is_this_one:
                self.state.save_to_json(os.path.join(staged_checkpoint_dir, TRAINER_STATE_NAME))
            if os.path.isdir(checkpoint_dir):
                # Saved again at the same step (Trainer would overwrite its files): the new one replaces it. A folder
                # cannot be renamed over a full one, and removing the old one first would lose it to a crash before
                # the rename; set aside instead, it is restored by `_recover_interrupted_saves` after such a crash.
                replaced_dir = checkpoint_dir + CHECKPOINT_REPLACED_SUFFIX
                os.replace(checkpoint_dir, replaced_dir)
                os.replace(staged_checkpoint_dir, checkpoint_dir)
                shutil.rmtree(replaced_dir)
            else:
                os.replace(staged_checkpoint_dir, checkpoint_dir)
            os.rmdir(staging_dir)
            # Trainer rotated the staging folder, which holds this checkpoint only; rotate the real ones.
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()  # the checkpoint exists under its name on every process's return

    # Draft-only checkpoints under DeepSpeed and FSDP. Trainer leaves frozen weights out of their checkpoints only for
    # PEFT models; a GLIDE draft's frozen target would otherwise be gathered and written at every save (16 GB for an
    # 8B target). Here the draft's weights are `model.safetensors` (`save_model`, gathering trainable tensors only);
    # DeepSpeed's engine state holds the draft's weights and optimizer shards; FSDP's holds the optimizer only, and
    # the weights resume from `model.safetensors`. Loads accept the missing target (`_forgive_missing_target_keys`).
    # PEFT drafts keep Trainer's own handling (adapter-only states).

    @property
    def _sharded_draft_only(self) -> bool:
        from accelerate.utils import is_peft_model

        return (self.is_deepspeed_enabled or self.is_fsdp_enabled) and not is_peft_model(self.model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        engine = self.model_wrapped
        if self._sharded_draft_only and self.is_fsdp_enabled:
            state_dict = gather_fsdp_draft_state_dict(self.model)
        elif self._sharded_draft_only and _deepspeed_gathers_16bit_weights(engine):
            state_dict = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        else:  # DDP, one device, ZeRO-1/2 (weights not sharded), PEFT
            super().save_model(output_dir, _internal_call)
            return
        self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._sharded_draft_only:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        if self.is_deepspeed_enabled:
            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        else:
            from accelerate.utils import save_fsdp_optimizer

            plugin = self.accelerator.state.fsdp_plugin
            save_fsdp_optimizer(plugin, self.accelerator, self.optimizer, self.model, output_dir)
        from accelerate.utils import DeepSpeedSchedulerWrapper

        # As Trainer: DeepSpeed's engine checkpoint holds its own scheduler, not one that Trainer created.
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # `train_glide` checked already; this covers `trainer.train(resume_from_checkpoint=...)` called directly.
        _check_checkpoint_files(resume_from_checkpoint)
        if self._sharded_draft_only and self.is_fsdp_enabled:
            load_draft_weights_into_fsdp(model if model is not None else self.model_wrapped, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if self._sharded_draft_only and self.is_fsdp_enabled:
            load_draft_weights_into_fsdp(self.model_wrapped, self.state.best_model_checkpoint)
        else:
            super()._load_best_model()


def _deepspeed_gathers_16bit_weights(engine) -> bool:
    """ZeRO-3 with `stage3_gather_16bit_weights_on_model_save` (otherwise Trainer saves engine shards only); False
    before `train()` has made the DeepSpeed engine."""
    if not hasattr(engine, "zero_optimization_partition_weights"):
        return False
    return engine.zero_optimization_partition_weights() and engine.zero_gather_16bit_weights_on_model_save()


def gather_fsdp_draft_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) trainable tensors and buffers of an FSDP-wrapped GLIDE model, on the CPU of the main
    process (empty elsewhere): the frozen target's weights are neither gathered nor returned. Every process calls it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def load_draft_weights_into_fsdp(model: torch.nn.Module, checkpoint_dir: str) -> None:
    """Load a checkpoint's draft weights (`model.safetensors`) into an FSDP-wrapped GLIDE model on every process.

    Each process reads the (one-layer) draft file and keeps its own shard of each tensor; the frozen target keeps the
    weights it was loaded with. Raises `GlideConfigError` when the file is missing or lacks a draft tensor.
    """
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    path = os.path.join(checkpoint_dir, SAFE_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise GlideConfigError(
            f"`{checkpoint_dir}` has no `{SAFE_WEIGHTS_NAME}`: FSDP runs resume the draft's weights from it. Was the "
            "checkpoint written with `fsdp_state_dict_type: FULL_STATE_DICT` by glide-hf?"
        )
    state_dict = load_file(path)
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    missing = sorted(expected - state_dict.keys())
    if missing:
        raise GlideConfigError(
            f"`{path}` lacks {len(missing)} trainable draft tensor(s), e.g. `{missing[0]}`: it is not a checkpoint "
            "of this draft."
        )
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=True))


def _recover_interrupted_saves(run_dir: str) -> None:
    """Undo what checkpoint saves that did not finish (the process was killed) left in `run_dir`.

    A `checkpoint-N.tmp` folder is an unfinished save: removed. A `checkpoint-N.replaced` folder is a complete
    `checkpoint-N` that a save at the same step had set aside: renamed back when `checkpoint-N` is missing (the crash
    came before the new one took its name), removed when the new `checkpoint-N` is in place.
    """
    if not os.path.isdir(run_dir):
        return
    for entry in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, entry)
        if not entry.startswith(f"{PREFIX_CHECKPOINT_DIR}-") or not os.path.isdir(path):
            continue
        if entry.endswith(CHECKPOINT_REPLACED_SUFFIX):
            checkpoint_dir = path.removesuffix(CHECKPOINT_REPLACED_SUFFIX)
            if os.path.isdir(checkpoint_dir):
                logger.warning(f"Removing `{path}`, the earlier `{checkpoint_dir}` that a later save replaced.")
                shutil.rmtree(path)
            else:
                logger.warning(
                    f"Restoring `{checkpoint_dir}` from `{path}`, where a checkpoint save that did not finish had "
                    "set it aside."
                )
                os.replace(path, checkpoint_dir)
        elif entry.endswith(CHECKPOINT_STAGING_SUFFIX):
            logger.warning(f"Removing `{path}`, left by a checkpoint save that did not finish.")
            shutil.rmtree(path)


# --- training --------------------------------------------------------------------------------------------------------


def build_glide_trainer(glide_args: GlideTrainingArguments, training_args: TrainingArguments) -> GlideTrainer:
    """Everything `train_glide` trains with, before training: target, draft, data, collator and callbacks.

    Useful to inspect or customise the `Trainer` (add callbacks, swap the optimizer) before `trainer.train()`.
    The models are built before the data is processed, so that a wrong target or `init_draft` fails fast; the data
    paths are checked before both (`check_data_paths`).
    """
    check_data_paths(glide_args)
    set_seed(training_args.seed)  # the draft's initialisation; Trainer seeds again before training
    target = load_target(glide_args, training_args)
    draft = build_draft(glide_args, target)
    tokenizer = load_tokenizer(glide_args)
    check_tokenizer_fits_target(glide_args, tokenizer, target)
    align_special_tokens(draft, tokenizer, target)
    data = build_data(glide_args, training_args, tokenizer)
    collator = build_collator(glide_args, training_args, tokenizer, target)
    trainer = GlideTrainer(
        model=draft,
        args=training_args,
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[_CollatorEpochCallback(collator)],
    )
    if data.eval_prompts and glide_args.acceptance_eval_prompts > 0:
        trainer.add_callback(
            AcceptanceEvalCallback(
                trainer, data.eval_prompts, glide_args.acceptance_eval_max_new_tokens, tokenizer.pad_token_id
            )
        )
    return trainer


def check_output_dir(glide_args: GlideTrainingArguments, training_args: TrainingArguments) -> None:
    """Refuse an `output_dir` whose contents a new run would destroy: the target's, the tokenizer's or the
    `init_draft`'s folder, or a folder holding an earlier run (its checkpoints or a saved draft) when neither resuming
    nor `overwrite_output_dir`."""
    output_dir = training_args.output_dir
    if not output_dir or not os.path.isdir(output_dir):
        return
    for name in ("target", "tokenizer", "init_draft"):
        source = getattr(glide_args, name)
        if source and os.path.isdir(source) and os.path.samefile(source, output_dir):
            raise GlideConfigError(
                f"`output_dir` {output_dir} is the `{name}` folder: the run would overwrite it. Give another "
                f"{_option('output_dir')}."
            )
    resuming = glide_args.resume or training_args.resume_from_checkpoint
    holds_run = get_last_checkpoint(output_dir) is not None or any(
        os.path.exists(os.path.join(output_dir, name)) for name in ("model.safetensors", "adapter_model.safetensors")
    )
    if holds_run and not resuming and not glide_args.overwrite_output_dir:
        raise GlideConfigError(
            f"`output_dir` {output_dir} already holds a run (checkpoints or a saved draft). Pass "
            f"{_option('resume', True)} to continue it, {_option('overwrite_output_dir', True)} to replace it, or "
            f"another {_option('output_dir')}."
        )


def _check_resumable(checkpoint: str) -> None:
    """Raise `GlideConfigError` unless `checkpoint` holds the weights, optimizer, scheduler and trainer state that
    resuming reads (a `--save-only-model` or damaged checkpoint would otherwise restart warm-up and the optimizer),
    and `CheckpointFormatError` when one of those files is truncated or of another format."""
    if not os.path.isdir(checkpoint):
        raise GlideConfigError(f"The checkpoint to resume from, {checkpoint}, is not a folder.")
    names = set(os.listdir(checkpoint))
    # DeepSpeed's engine checkpoint (`latest`, `global_step*/`) holds the optimizer, and its own scheduler.
    deepspeed = any(name == "latest" or name.startswith("global_step") for name in names)
    required = [TRAINER_STATE_NAME] if deepspeed else [TRAINER_STATE_NAME, SCHEDULER_NAME]
    missing = [f"{name} ({RESUME_FILE_CONTENTS[name]})" for name in required if name not in names]
    # The Trainer's own optimizer is one file, FSDP's a folder `optimizer_0`.
    if not deepspeed and not any(name.startswith("optimizer") for name in names):
        missing.append(f"{OPTIMIZER_NAME} ({RESUME_FILE_CONTENTS[OPTIMIZER_NAME]})")
    if missing:
        listing = missing[0] if len(missing) == 1 else f"{', '.join(missing[:-1])} and {missing[-1]}"
        raise GlideConfigError(
            f"The checkpoint {checkpoint} lacks {listing}: resuming would restart the optimizer and the "
            f"learning-rate schedule. It may have been saved with {_option('save_only_model', True)} or cut short. "
            f"To train on from its weights as a new stage, pass {_option('init_draft', checkpoint)} instead of "
            "resuming."
        )
    _check_checkpoint_files(checkpoint)


def _check_checkpoint_files(checkpoint: str) -> None:
    """Raise `CheckpointFormatError` when a file that resuming reads from `checkpoint` is truncated or of another
    format, which Trainer would report from deep inside json, safetensors or torch, after the target and the data
    were loaded.

    Reads headers only: the JSON files parse (`trainer_state.json` as a Trainer state), each `*.safetensors` file's
    header is whole (safetensors checks that it covers the file), and each `torch.save` file (`optimizer.pt`,
    `scheduler.pt`, `rng_state*.pth`, ...) ends with the directory of its zip archive, which truncation cuts off.
    """
    damaged = []  # (file name, what is wrong with it)
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            continue  # FSDP's and DeepSpeed's folders: read by their own loaders
        try:
            if name == TRAINER_STATE_NAME:
                TrainerState.load_from_json(path)
            elif name == CONFIG_NAME or name.endswith(".index.json"):
                with open(path, encoding="utf-8") as handle:
                    json.load(handle)
            elif name.endswith(".safetensors"):
                with safe_open(path, framework="pt"):
                    pass
            elif name.endswith(TORCH_CHECKPOINT_SUFFIXES) and name != TRAINING_ARGS_NAME:  # not read on resume
                with zipfile.ZipFile(path):
                    pass
        # JSON and text decoding errors are ValueErrors; a Trainer state of unknown fields is a TypeError.
        except (ValueError, TypeError, EOFError, zipfile.BadZipFile, SafetensorError) as error:
            damaged.append((name, f"{type(error).__name__}: {error}"))
    if not damaged:
        return
    described = [f"`{name}` ({reason})" for name, reason in damaged]
    files = f"its file {described[0]} is" if len(damaged) == 1 else f"its files {', '.join(described)} are"
    earlier = _earlier_checkpoint(checkpoint)
    remedy = f"Resume from an earlier checkpoint instead: {_option('resume_from_checkpoint', earlier or 'PATH')}"
    # What `--init-draft` loads (`from_pretrained`): the config and the weights.
    draft_files_damaged = any(
        name == CONFIG_NAME or name.startswith("pytorch_model") or name.endswith((".safetensors", ".index.json"))
        for name, _ in damaged
    )
    if not draft_files_damaged:
        remedy += f"; or train on from its weights as a new stage: {_option('init_draft', checkpoint)}, not resuming"
    raise CheckpointFormatError(
        f"The checkpoint {checkpoint} cannot be resumed: {files} truncated or not in the expected format (a save "
        f"or copy cut short, or a file of another kind). {remedy}."
    )


def _earlier_checkpoint(checkpoint: str) -> str | None:
    """The `checkpoint-M` folder beside `checkpoint-N` with the largest step M < N, if there is one."""
    run_dir, name = os.path.split(os.path.normpath(checkpoint))
    pattern = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
    match = pattern.fullmatch(name)
    if match is None:
        return None
    run_dir = run_dir or "."
    steps = [
        int(other.group(1))
        for other in map(pattern.fullmatch, os.listdir(run_dir))
        if other is not None
        and int(other.group(1)) < int(match.group(1))
        and os.path.isdir(os.path.join(run_dir, other.group(0)))
    ]
    return os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{max(steps)}") if steps else None


def resolve_checkpoint(glide_args: GlideTrainingArguments, training_args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: `training_args.resume_from_checkpoint`, or with `resume` the last
    `checkpoint-*` folder in `output_dir` (None, and a fresh start, when there is none). A checkpoint without its
    optimizer and scheduler state is refused."""
    if training_args.resume_from_checkpoint:
        _check_resumable(training_args.resume_from_checkpoint)
        return training_args.resume_from_checkpoint
    if not glide_args.resume:
        return None
    output_dir = training_args.output_dir
    checkpoint = get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
    if checkpoint is None:
        logger.info(f"`resume`: no checkpoint in `{output_dir}`, starting a new run.")
    else:
        _check_resumable(checkpoint)
        logger.info(f"Resuming from `{checkpoint}`.")
    return checkpoint


def _final_eval_metrics(trainer: Trainer) -> dict:
    """Evaluation metrics of the last step: those the schedule logged there, else a new evaluation (acceptance
    decoding is not cheap, so an evaluation that just ran is not repeated)."""
    step = trainer.state.global_step
    logged = {
        key: value
        for entry in trainer.state.log_history
        if entry.get("step") == step
        for key, value in entry.items()
        if key.startswith("eval_")
    }
    return logged if "eval_loss" in logged else trainer.evaluate()


def train_glide(glide_args: GlideTrainingArguments, training_args: TrainingArguments) -> GlideForCausalLM:
    """Train a GLIDE draft for a target with a stock `transformers.Trainer` and save it to `output_dir`.

    Builds the pieces with `build_glide_trainer`, resumes when asked (`resolve_checkpoint`), trains, evaluates once
    more at the end when there is held-out data, and saves the draft (weights without the target, config naming the
    target, generation config), the tokenizer, a model card, `trainer_state.json` and the final metrics
    (`all_results.json`) to `training_args.output_dir`.

    Args:
        glide_args (`GlideTrainingArguments`): target, data and recipe.
        training_args (`transformers.TrainingArguments`): optimizer, schedule, batch size, precision (`bf16=True`
            autocasts the fp32 draft), checkpoints, evaluation schedule (`eval_strategy`, `eval_steps`), logging.

    Returns:
        `GlideForCausalLM`: the trained draft, with its target attached.

    Example:

    ```python
    >>> from transformers import TrainingArguments
    >>> from glide_hf.trainer import GlideTrainingArguments, train_glide

    >>> glide_args = GlideTrainingArguments(target="Qwen/Qwen2.5-7B-Instruct", data=["slimpajama.jsonl"],
    ...                                     max_length=1024, packing=True, anchor_offset=True)
    >>> training_args = TrainingArguments(output_dir="glide-stage1", bf16=True, learning_rate=5e-4, max_steps=1000)
    >>> draft = train_glide(glide_args, training_args)
    ```
    """
    # Before the output folder is judged and a checkpoint picked: a checkpoint set aside by a save that a crash cut
    # short is one of the run's checkpoints again. One process per file system renames (as `GlideTrainer` saves).
    with training_args.main_process_first(local=training_args.save_on_each_node, desc="checkpoint recovery"):
        if training_args.should_save:
            _recover_interrupted_saves(training_args.output_dir)
    check_output_dir(glide_args, training_args)
    checkpoint = resolve_checkpoint(glide_args, training_args)
    trainer = build_glide_trainer(glide_args, training_args)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(_final_eval_metrics(trainer))
    output_dir = training_args.output_dir
    trainer.save_model(output_dir)
    trainer.save_state()
    trainer.save_metrics("all", metrics, combined=False)
    draft = trainer.model
    if trainer.is_world_process_zero():
        write_model_card(draft, output_dir, tags=MODEL_CARD_TAGS)
        logger.info(f"Saved the GLIDE draft to `{output_dir}`.")
    return draft


# --- command line ----------------------------------------------------------------------------------------------------


def _apply_config_file(parser: HfArgumentParser, argv: list[str]) -> list[str]:
    """If `argv` starts with a YAML or JSON file, make its keys the parser's defaults (the remaining flags override
    them) and return the remaining flags."""
    if not argv or argv[0].startswith("-") or not argv[0].lower().endswith(CONFIG_FILE_SUFFIXES):
        return argv
    path = argv[0]
    yaml_errors = ()
    try:
        with open(path, encoding="utf-8") as handle:
            if path.lower().endswith(".json"):
                values = json.load(handle)
            else:
                import yaml

                yaml_errors = (yaml.YAMLError,)
                values = yaml.safe_load(handle)
    except (OSError, ValueError, *yaml_errors) as error:
        parser.error(f"cannot read the config file {path}: {error}")
    if not isinstance(values, dict):
        parser.error(f"the config file {path} must hold a mapping of flag names to values")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"unknown keys in {path}: {', '.join(unknown)}")
    # `set_defaults` also reaches a `--no_*` flag sharing the destination. argparse converts string defaults with
    # the flag's type, so YAML's `5e-4` (a string in YAML 1.1) becomes a float.
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:
            action.required = False
    return argv[1:]


# `TrainingArguments` flags that it refuses on a machine without the hardware for them.
BF16_FLAGS = ("bf16", "bf16_full_eval")
BF16_HARDWARE = "a GPU with bf16 (NVIDIA Ampere or newer) or a TPU"
TF32_HARDWARE = "an NVIDIA Ampere or newer GPU"


def _precision_flags_unsupported_here(values: dict) -> dict[str, str]:
    """The precision flags set in `values` (`TrainingArguments` fields) that `TrainingArguments` refuses on this
    machine, each with the hardware it needs (its own checks: bf16 without `use_cpu`, tf32)."""
    unsupported = {}
    if not values.get("use_cpu") and not is_torch_bf16_gpu_available() and not is_torch_xla_available():
        unsupported.update({name: BF16_HARDWARE for name in BF16_FLAGS if values.get(name)})
    if values.get("tf32") and not is_torch_tf32_available():
        unsupported["tf32"] = TF32_HARDWARE
    return unsupported


def _training_arguments_here(values: dict) -> tuple[TrainingArguments, dict[str, str]]:
    """`TrainingArguments(**values)`, telling a refusal for this machine's hardware alone from the others: when
    `TrainingArguments` refuses only because this machine lacks the hardware for `bf16` (or `bf16_full_eval`,
    `tf32`), they are turned off and the arguments built again, so that every other check still runs. Returns the
    arguments and the flags turned off, each with the hardware it needs. `--dry-run` (which checks a config before
    it gets GPU time, so possibly on a machine without a GPU) prints them back as asked (`resolved_config`); a real
    run stops with one line saying what to do.

    Not when `fp16` is also set with bf16: the retry would hide the conflict, which `TrainingArguments` reports
    after the hardware check."""
    try:
        return TrainingArguments(**values), {}
    except ValueError:
        unsupported = _precision_flags_unsupported_here(values)
        conflict = (values.get("fp16") and values.get("bf16")) or (
            values.get("fp16_full_eval") and values.get("bf16_full_eval")
        )
        if not unsupported or conflict:
            raise
    # Any error now is not about this machine's hardware: the run would meet it too.
    return TrainingArguments(**{**values, **dict.fromkeys(unsupported, False)}), unsupported


def parse_train_args(
    argv: list[str], prog: str = "glide-hf train"
) -> tuple[GlideTrainingArguments, TrainingArguments, GlideCliArguments]:
    """Parse `glide-hf train` flags (optionally after a YAML/JSON config file); invalid values exit through
    `parser.error` (status 2). With `--dry-run`, precision flags that this machine cannot run (bf16 without a GPU)
    are checked with them off and listed in `cli_args.unsupported_here` (`_training_arguments_here`)."""
    parser = HfArgumentParser(
        (GlideTrainingArguments, TrainingArguments, GlideCliArguments),
        prog=prog,
        description="Train a GLIDE draft for a target model (Trainer, LongSpec recipe). A YAML or JSON file of the "
        "same fields may come first; later flags override it.",
    )
    argv = _apply_config_file(parser, list(argv))
    # As `parser.parse_args_into_dataclasses`, with `TrainingArguments` built last (it needs `dry_run`).
    namespace, remaining = parser.parse_known_args(args=argv)
    values = vars(namespace)

    def fields_of(dataclass_type) -> dict:
        return {item.name: values[item.name] for item in dataclasses.fields(dataclass_type) if item.init}

    try:
        glide_args = GlideTrainingArguments(**fields_of(GlideTrainingArguments))
        cli_args = GlideCliArguments(**fields_of(GlideCliArguments))
        training_args, cli_args.unsupported_here = _training_arguments_here(fields_of(TrainingArguments))
        if cli_args.unsupported_here and not cli_args.dry_run:
            unsupported = cli_args.unsupported_here
            flags = ", ".join(f"--{name} needs {hardware}" for name, hardware in unsupported.items())
            parser.error(
                f"{flags}, which this machine lacks. Run on such a GPU, or pass "
                f"{' '.join(f'--{name} false' for name in unsupported)} to train here in float32 (slow); "
                "`--dry-run` checks the rest of the configuration on this machine."
            )
    except ValueError as error:  # dataclass checks: `GlideConfigError` and TrainingArguments' own
        parser.error(str(error))
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    if glide_args.resume and training_args.resume_from_checkpoint:
        parser.error("give `--resume` (last checkpoint in output_dir) or `--resume_from_checkpoint PATH`, not both")
    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        parser.error("nothing to train: give `--max-steps` >= 1 or `--num-train-epochs` > 0")
    if training_args.save_strategy == "steps" and training_args.save_steps <= 0:
        parser.error(
            "`--save-steps` must be positive with `--save-strategy steps` (`--save-strategy no` turns checkpoints off)"
        )
    return glide_args, training_args, cli_args


def resolved_config(
    glide_args: GlideTrainingArguments,
    training_args: TrainingArguments,
    unsupported_here: dict[str, str] | None = None,
) -> dict:
    """The configuration a run would use, as JSON-ready data (what `--dry-run` prints).

    `unsupported_here` (`cli_args.unsupported_here`): precision flags that were turned off to build
    `training_args` on this machine. The `training` section shows them as the run asked (on), `resolved.target_dtype`
    is resolved as on a CUDA GPU, and `resolved.hardware_note` says what the run needs.
    """
    training = json.loads(training_args.to_json_string())
    # Flags turned off here: `target_dtype` as on the CUDA GPU the run needs.
    target_dtype = resolve_target_dtype(glide_args, training_args, "cuda" if unsupported_here else None)
    resolved = {
        "target_dtype": str(target_dtype).removeprefix("torch."),
        "resume_from_checkpoint": resolve_checkpoint(glide_args, training_args),
    }
    if unsupported_here:
        training.update(dict.fromkeys(unsupported_here, True))
        needs = "; ".join(f"`{name}` needs {hardware}" for name, hardware in unsupported_here.items())
        flags = ", ".join(f"`{name}`" for name in unsupported_here)
        resolved["hardware_note"] = (
            f"The run needs hardware this machine lacks: {needs}. The dry run checked the rest of the configuration "
            f"with {flags} off; the `training` section shows the values the run will use, and `target_dtype` is "
            "resolved as on a CUDA GPU."
        )
    return {"glide": dataclasses.asdict(glide_args), "training": training, "resolved": resolved}


def _process_log_level(training_args: TrainingArguments) -> int:
    """The level of glide_hf's logs for this process: the Trainer's (info on the main process, warnings on the
    others unless `log_level_replica` says otherwise)."""
    level = training_args.get_process_log_level()
    if training_args.should_log and training_args.log_level == "passive":
        level = pylogging.INFO  # lifecycle messages (data counts, resume, save) on the main process
    return level


def run_cli(argv: list[str], prog: str) -> int:
    """`glide-hf train`: parse the flags, then `train_glide` (or print the configuration with `--dry-run`)."""
    glide_args, training_args, cli_args = parse_train_args(argv, prog)
    if cli_args.dry_run:
        print(json.dumps(resolved_config(glide_args, training_args, cli_args.unsupported_here), indent=2))
        return 0
    try:
        with cli_logging(_process_log_level(training_args)):
            train_glide(glide_args, training_args)
        if cli_args.output_json and training_args.should_save:
            with open(os.path.join(training_args.output_dir, "all_results.json"), encoding="utf-8") as handle:
                metrics = json.load(handle)
            with open(cli_args.output_json, "w", encoding="utf-8") as handle:
                json.dump({"output_dir": training_args.output_dir, "metrics": metrics}, handle, indent=2)
    finally:
        # Under `accelerate launch` the process group outlives Trainer; left to interpreter shutdown, gloo's
        # teardown sometimes aborts the process ("terminate called without an active exception").
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


__all__ = [
    "AcceptanceEvalCallback",
    "GlideCliArguments",
    "GlideTrainer",
    "GlideTrainingArguments",
    "align_special_tokens",
    "build_collator",
    "build_data",
    "build_draft",
    "build_glide_trainer",
    "check_data_paths",
    "check_tokenizer_fits_target",
    "load_target",
    "load_tokenizer",
    "parse_train_args",
    "resolve_checkpoint",
    "resolve_target_dtype",
    "resolved_config",
    "run_cli",
    "tokens_per_target_forward",
    "train_glide",
]
