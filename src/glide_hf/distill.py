"""Self-distillation data: `glide-hf distill-data` and `distill_data` regenerate training responses with the target.

A draft accepts more tokens when it learns the target's own distribution rather than the data's. `distill_data`
reads prompts from training data, generates the target's responses in batches, and writes records of the same
format with the target's response in place of the original one, ready for `glide-hf train`:

| format          | read as the prompt                                         | written                             |
| --------------- | ---------------------------------------------------------- | ----------------------------------- |
| `chat`          | `messages` before the final assistant turn, rendered with   | the prompt turns, then the target's |
|                 | the chat template and `add_generation_prompt=True`          | reply as the last assistant turn    |
| `source_target` | `source` (or `prompt_field`); `target` may be absent        | `source` and the target's `target`  |
| `text`          | the first `text_prompt_tokens` tokens of `text`             | that prefix + the continuation      |

A conversation that does not end with an assistant turn (prompts only, or a last user turn) is a prompt as a whole
and gets the reply appended; only the final assistant turn is regenerated, earlier ones stay as the data has them.
Other fields of a record are kept; with another `prompt_field`, that field is written as `source` (the name
`glide-hf train` reads).

Runs are resumable. Records are written in input order, one batch per write, flushed and synced, so a killed run
loses at most the batch in progress (and may leave its last line cut short). On restart the output's complete
records are counted, a cut-short last line is dropped, each complete record is checked to answer the prompt of the
input record in the same position (`ResumeMismatchError` otherwise), and generation continues with the next prompt.
Greedy decoding (the default) regenerates exactly what an uninterrupted run writes. Sampling seeds each batch from
`seed` and the index of its first record.

Reading: files are found and classified by `data.resolve_sources` (JSONL, JSON, Parquet, glob patterns, saved
`datasets` folders), but read here: `data.load_records` is the training loader, which requires a response in every
pair and keeps only the training fields, while distillation takes prompts-only files and keeps every field.

What this file leaves to others: decoding (`target.generate`, or `GlideForCausalLM.generate` with `draft`),
training on the output (`data.py`, `trainer.py`), subcommand dispatch (`cli.py`).
"""

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, PreTrainedModel
from transformers.utils import logging

from .cli import cli_logging
from .data import (
    BadRecord,
    DataSource,
    _iter_json,
    _iter_parquet,
    _load_from_disk,
    check_chat_template,
    iter_jsonl,
    resolve_sources,
)
from .errors import DataFormatError, EmptyDatasetError, GlideConfigError, ResumeMismatchError, TargetNotFoundError

logger = logging.get_logger(__name__)

DistillFormat = Literal["auto", "text", "chat", "source_target"]
DISTILL_FORMATS = ("text", "chat", "source_target")
TARGET_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Bad records named in the skipped-records warning; the count covers all.
MAX_REPORTED_BAD_RECORDS = 5


# --- reading prompts -------------------------------------------------------------------------------------------------


def _iter_raw(source: DataSource) -> Iterator[tuple[str, Any]]:
    """`(location, record)` of every record of `source`, in order; `location` is `path:line` for JSONL, else
    `path, record i` / `path, row i`. A line that is not valid JSON comes as a `BadRecord`; a file that is not
    readable as its type raises `DataFormatError` (the readers of `data.py`)."""
    if source.kind == "jsonl":
        yield from _iter_jsonl(source.path)
    elif source.kind == "json":
        for where, record in _iter_json(source.path):
            # `line n` when the `.json` file holds one record per line, `record i` for a list.
            line = where.removeprefix("line ")
            yield (f"{source.path}:{line}" if line != where else f"{source.path}, {where}"), record
    elif source.kind == "parquet":
        for where, record in _iter_parquet(source.path, known_fields_only=False):  # any column may be the prompt
            yield f"{source.path}, {where}", record
    else:
        import datasets

        loaded = _load_from_disk(source.path)
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded and len(loaded) != 1:
                raise DataFormatError(
                    f"`{source.path}` is a DatasetDict with splits {sorted(loaded)} and no `train` split: save the "
                    "split to distill by itself (`dataset_dict[name].save_to_disk(...)`)."
                )
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        for row, record in enumerate(loaded):
            yield f"{source.path}, row {row}", record


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    for line_number, record in iter_jsonl(path):
        yield f"{path}:{line_number}", record


def _detect_format(record: dict, prompt_field: str) -> str | None:
    """`chat` (`messages`), `source_target` (`target`, or a prompt in `prompt_field`), `text` (`text`), or None.

    `target` is checked before `text` and `prompt_field` after it: LongSpec's long-document records carry `source`
    as a tag beside `text`, and only a `target` marks a pair.
    """
    for data_format, marker in (("chat", "messages"), ("source_target", "target"), ("text", "text")):
        if record.get(marker) is not None:
            return data_format
    return "source_target" if record.get(prompt_field) is not None else None


def _check_record(record: Any, data_format: str, prompt_field: str) -> None:
    """Raise `BadRecord` unless `record` holds a prompt of `data_format`."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, found {type(record).__name__}")
    if data_format == "chat":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRecord("`messages` must be a non-empty list of {role, content} objects")
        for index, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)
            ):
                raise BadRecord(f"`messages[{index}]` needs string `role` and `content` fields")
        if not _prompt_messages(messages):
            raise BadRecord("the conversation has no turn before its assistant reply, so there is no prompt")
        return
    name = "text" if data_format == "text" else prompt_field
    value = record.get(name)
    if not isinstance(value, str) or not value:
        found = "no such field" if value is None else ("an empty string" if value == "" else type(value).__name__)
        raise BadRecord(f"`{name}` must be a non-empty string, found {found}")


def _prompt_messages(messages: list[dict]) -> list[dict]:
    """The turns before a final assistant turn, or the whole conversation when it does not end with one."""
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


@dataclass
class _Reader:
    """The records of `sources` that hold a prompt of `data_format`, in order; bad ones raise or are skipped."""

    sources: list[DataSource]
    data_format: str
    prompt_field: str
    skip_bad_lines: bool

    def records(self, skipped: list[str] | None = None) -> Iterator[tuple[str, dict]]:
        """`(location, record)` of the usable records; skipped ones are appended to `skipped` as `location: why`."""
        for source in self.sources:
            for location, record in _iter_raw(source):
                try:
                    if isinstance(record, BadRecord):
                        raise record
                    _check_record(record, self.data_format, self.prompt_field)
                except BadRecord as reason:
                    if not self.skip_bad_lines:
                        raise DataFormatError(
                            f"{location}: {reason} (data format `{self.data_format}`). Fix the record, or set "
                            "`skip_bad_lines` (`--skip-bad-lines`) to skip and count bad records."
                        ) from None
                    if skipped is not None:
                        skipped.append(f"{location}: {reason}")
                    continue
                yield location, record

    def count(self) -> tuple[int, list[str]]:
        """`(usable records, skipped ones)`: one full pass, so that bad input fails before any generation."""
        skipped = []
        num_records = sum(1 for _ in self.records(skipped))
        return num_records, skipped


def _resolve_format(sources: list[DataSource], data_format: str, prompt_field: str) -> str:
    """`data_format`, or the format of the first record (all records are then read as that format)."""
    if data_format != "auto":
        if data_format not in DISTILL_FORMATS:
            raise DataFormatError(f"`data_format` must be 'auto' or one of {DISTILL_FORMATS}, got {data_format!r}.")
        return data_format
    for source in sources:
        for location, record in _iter_raw(source):
            if not isinstance(record, dict):
                continue
            detected = _detect_format(record, prompt_field)
            if detected is None:
                raise DataFormatError(
                    f"{location}: cannot tell the data format from the fields {sorted(record)}. Expected `messages` "
                    f"(chat), `{prompt_field}` with an optional `target` (source_target; see `prompt_field`) or "
                    "`text` (text); or set `data_format`."
                )
            return detected
    raise EmptyDatasetError(
        f"No record in {', '.join(source.path for source in sources)}: the data files are empty or hold no JSON "
        "objects."
    )


# --- prompts and outputs ---------------------------------------------------------------------------------------------


@dataclass
class _Prompt:
    """One record ready to generate from: its token ids, and what the output record is built from."""

    location: str
    record: dict
    input_ids: list[int]
    prompt: str | list[dict]  # the source, the text prefix, or the prompt turns


@dataclass
class _PromptBuilder:
    tokenizer: Any
    data_format: str
    prompt_field: str
    text_prompt_tokens: int

    def __call__(self, location: str, record: dict) -> _Prompt:
        if self.data_format == "chat":
            messages = _prompt_messages(record["messages"])
            try:
                rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as error:  # the template's own errors (`raise_exception`, jinja) name no record
                raise DataFormatError(
                    f"{location}: the tokenizer's chat template failed on this conversation "
                    f"({type(error).__name__}: {error})."
                ) from error
            # The template writes the special tokens it wants (BOS included), as `data.py` tokenizes chat data.
            ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
            prompt = messages
        elif self.data_format == "source_target":
            prompt = record[self.prompt_field]
            # BOS in front of the source, as `data.py` tokenizes pairs for training.
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids, prompt = self._text_prefix(record["text"])
        if not ids:
            raise DataFormatError(f"{location}: the prompt is empty after tokenization.")
        return _Prompt(location, record, list(ids), prompt)

    def _text_prefix(self, text: str) -> tuple[list[int], str]:
        """The first `text_prompt_tokens` tokens of `text` (special tokens the tokenizer adds included), and the
        characters they cover, so that the output is the original text up to there plus the continuation."""
        fast = getattr(self.tokenizer, "is_fast", False)
        encoded = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=fast)
        ids = encoded["input_ids"][: self.text_prompt_tokens]
        if fast:
            end = max((stop for _, stop in encoded["offset_mapping"][: len(ids)]), default=0)
            return ids, text[:end]
        return ids, self.tokenizer.decode(ids, skip_special_tokens=True)


def _output_record(prompt: _Prompt, data_format: str, prompt_field: str, response: str) -> dict:
    record = dict(prompt.record)
    if data_format == "chat":
        record["messages"] = [*prompt.prompt, {"role": "assistant", "content": response}]
    elif data_format == "source_target":
        # The prompt is written as `source`, in the prompt field's place; with another `prompt_field`, a `source`
        # field of the input (e.g. a tag) gives way to it.
        record = {
            ("source" if key == prompt_field else key): value
            for key, value in record.items()
            if key != "source" or prompt_field == "source"
        }
        record["target"] = response
    else:
        record["text"] = prompt.prompt + response
    return record


def _answers(output: Any, prompt: _Prompt, data_format: str) -> bool:
    """Whether an output record written earlier answers `prompt` (the check that makes resuming safe)."""
    if not isinstance(output, dict):
        return False
    if data_format == "chat":
        messages = output.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            return False
        return messages[:-1] == prompt.prompt and messages[-1].get("role") == "assistant"
    if data_format == "source_target":
        return output.get("source") == prompt.prompt and isinstance(output.get("target"), str)
    text = output.get("text")
    return isinstance(text, str) and text.startswith(prompt.prompt)


# --- the output file -------------------------------------------------------------------------------------------------


def _count_complete_records(path: str) -> int:
    """Complete records (lines ending in a newline) of an earlier run's output; a last line without its newline
    was cut short by a killed run and is removed from the file."""
    num_records, offset = 0, 0
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                break
            try:
                json.loads(raw)
            except ValueError as error:
                raise ResumeMismatchError(
                    f"{path}:{line_number}: not a JSON record ({error}), so this file cannot be resumed: it was "
                    "not written by `distill-data` or was damaged. Pass `resume=False` (`--no-resume`) to overwrite "
                    "it, or choose another output file."
                ) from None
            num_records += 1
            offset += len(raw)
    size = os.path.getsize(path)
    if size > offset:
        logger.warning(f"Dropping a truncated last line ({size - offset} bytes) from `{path}` (an interrupted run).")
        with open(path, "r+b") as handle:
            handle.truncate(offset)
    return num_records


def _read_output(path: str) -> Iterator[Any]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


# --- generation ------------------------------------------------------------------------------------------------------


@dataclass
class DistillStats:
    """What `distill_data` did.

    Args:
        output_file (`str`): the file written.
        data_format (`str`): the format the records were read and written in.
        num_records (`int`): usable input records (= records in the output file after a complete run).
        num_resumed (`int`): records found in the output file from an earlier run, not generated again.
        num_generated (`int`): records generated by this call.
        num_skipped (`int`): bad input records skipped (`skip_bad_lines`).
        num_new_tokens (`int`): tokens generated by this call (end-of-sequence tokens excluded).
    """

    output_file: str
    data_format: str
    num_records: int
    num_resumed: int
    num_generated: int
    num_skipped: int
    num_new_tokens: int

    def summary(self) -> str:
        return (
            f"{self.num_records} `{self.data_format}` records in `{self.output_file}`: {self.num_generated} generated "
            f"({self.num_new_tokens} new tokens), {self.num_resumed} kept from an earlier run, {self.num_skipped} bad "
            "input records skipped."
        )


def _load_target(target: str, target_kwargs: dict | None, device: str | None) -> PreTrainedModel:
    kwargs = dict(target_kwargs or {})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs.setdefault("dtype", torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(target, **kwargs)
    except OSError as error:
        raise TargetNotFoundError(f"The target `{target}` could not be loaded: {error}") from error
    if "device_map" not in kwargs:
        model = model.to(device)
    return model.eval()


def _load_tokenizer(target: PreTrainedModel, tokenizer):
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    name = tokenizer or target.config._name_or_path
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise TargetNotFoundError(
            f"No tokenizer could be loaded from `{name}` ({error}). Pass the target's tokenizer as `tokenizer=` "
            "(`--tokenizer`)."
        ) from error


def _eos_ids(target: PreTrainedModel, tokenizer) -> list[int]:
    eos = target.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _left_pad(prompts: list[_Prompt], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(prompt.input_ids) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt.input_ids) :] = torch.tensor(prompt.input_ids, dtype=torch.long)
        attention_mask[row, width - len(prompt.input_ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _strip_after_eos(ids: list[int], eos_ids: list[int]) -> list[int]:
    """New tokens up to (not including) the first end-of-sequence token; later ones are padding."""
    for index, token in enumerate(ids):
        if token in eos_ids:
            return ids[:index]
    return ids


def distill_data(
    target_name_or_path_or_model: str | PreTrainedModel,
    data_files: list[str] | str,
    output_file: str,
    tokenizer=None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    data_format: DistillFormat = "auto",
    prompt_field: str = "source",
    text_prompt_tokens: int = 128,
    resume: bool = True,
    skip_bad_lines: bool = False,
    draft=None,
    seed: int = 0,
    target_kwargs: dict | None = None,
    device: str | None = None,
) -> DistillStats:
    """Regenerate the responses of training data with the target (self-distillation); see the module docstring for
    what each format reads and writes.

    Args:
        target_name_or_path_or_model (`str` or `PreTrainedModel`): the target, loaded (used as it is) or a Hub id or
            local path (loaded with `target_kwargs`, in bfloat16 on CUDA and float32 on CPU unless `dtype` is given).
        data_files (`list[str]` or `str`): JSONL, JSON or Parquet files, glob patterns, or saved `datasets` folders;
            read in order.
        output_file (`str`): JSONL file to write (parent folders are created).
        tokenizer (`PreTrainedTokenizerBase` or `str`, *optional*): the target's tokenizer; default: loaded from
            the target's name or path.
        max_new_tokens (`int`, *optional*, defaults to 256): longest response, in tokens.
        batch_size (`int`, *optional*, defaults to 8): prompts per `generate` call (left-padded).
        do_sample (`bool`, *optional*, defaults to `False`): sample instead of greedy decoding.
        temperature (`float`, *optional*): sampling temperature; default: the target's generation config.
        top_p (`float`, *optional*): nucleus sampling; default: the target's generation config.
        data_format (`str`, *optional*, defaults to `"auto"`): `"chat"`, `"source_target"`, `"text"`, or `"auto"`
            (from the first record's fields).
        prompt_field (`str`, *optional*, defaults to `"source"`): the field holding the prompt of `source_target`
            records (e.g. `"prompt"` for files of `{"prompt": ...}`); written back as `source`.
        text_prompt_tokens (`int`, *optional*, defaults to 128): prompt length of `text` records, in tokens (the
            BOS the tokenizer adds included).
        resume (`bool`, *optional*, defaults to `True`): continue an interrupted run that wrote `output_file`
            (`False` overwrites it).
        skip_bad_lines (`bool`, *optional*, defaults to `False`): skip and count records without a usable prompt
            instead of raising `DataFormatError` at the first.
        draft (`GlideForCausalLM` or `str`, *optional*): a GLIDE draft of this target (model, or path loaded onto
            the target) to decode with `draft.generate`: same output, fewer target forwards.
        seed (`int`, *optional*, defaults to 0): with `do_sample`, each batch seeds torch's generator with
            `seed + index of its first record`.
        target_kwargs (`dict`, *optional*): `from_pretrained` arguments when the target is loaded here.
        device (`str`, *optional*): device for a target loaded here; default: CUDA when available.

    Returns:
        `DistillStats`, also logged.

    Raises:
        `DataNotFoundError`, `DataFormatError` (naming file and line), `EmptyDatasetError`, `ChatTemplateError`
        (chat data and a tokenizer without a chat template), `ResumeMismatchError` (the output file holds records
        for other prompts), `TargetNotFoundError`.

    Example:

    ```python
    >>> from glide_hf.distill import distill_data
    >>> stats = distill_data("Qwen/Qwen2.5-7B-Instruct", ["chats/*.jsonl"], "distilled/chats.jsonl",
    ...                      max_new_tokens=1024, batch_size=32)
    ```
    """
    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("batch_size", batch_size),
        ("text_prompt_tokens", text_prompt_tokens),
    ):
        if not isinstance(value, int) or value < 1:
            raise GlideConfigError(f"`{name}` must be an integer >= 1, got {value!r}.")
    if temperature is not None and temperature <= 0:
        raise GlideConfigError(f"`temperature` must be > 0, got {temperature}; use `do_sample=False` for greedy.")
    if not do_sample and (temperature is not None or top_p is not None):
        raise GlideConfigError("`temperature` and `top_p` apply to sampling: set `do_sample=True`, or drop them.")
    sources = resolve_sources(data_files)
    if any(os.path.abspath(source.path) == os.path.abspath(output_file) for source in sources):
        raise GlideConfigError(f"`output_file` `{output_file}` is also an input file: write to another file.")
    data_format = _resolve_format(sources, data_format, prompt_field)
    reader = _Reader(sources, data_format, prompt_field, skip_bad_lines)
    num_records, bad = reader.count()
    if bad:
        shown = "; ".join(bad[:MAX_REPORTED_BAD_RECORDS]) + ("; ..." if len(bad) > MAX_REPORTED_BAD_RECORDS else "")
        logger.warning(f"Skipping {len(bad)} bad input records ({shown}).")
    if num_records == 0:
        raise EmptyDatasetError(
            f"No record with a usable prompt in {', '.join(source.path for source in sources)}"
            + (" (every record was bad and skipped)." if bad else ".")
        )

    if isinstance(target_name_or_path_or_model, str):
        target = _load_target(target_name_or_path_or_model, target_kwargs, device)
    else:
        target = target_name_or_path_or_model.eval()
    tokenizer = _load_tokenizer(target, tokenizer)
    if data_format == "chat":
        check_chat_template(tokenizer)
    draft = _prepare_draft(draft, target)
    build_prompt = _PromptBuilder(tokenizer, data_format, prompt_field, text_prompt_tokens)

    output_dir = os.path.dirname(os.path.abspath(output_file))
    os.makedirs(output_dir, exist_ok=True)
    num_done = _count_complete_records(output_file) if resume and os.path.exists(output_file) else 0
    if num_done > num_records:
        raise ResumeMismatchError(
            f"`{output_file}` already holds {num_done} records, more than the {num_records} usable input records: it "
            "was written from other data. Pass `resume=False` (`--no-resume`) to overwrite it, or choose another "
            "output file."
        )
    logger.info(
        f"Distilling {num_records} `{data_format}` records into `{output_file}`"
        + (f": {num_done} already there from an earlier run." if num_done else ".")
    )

    eos_ids = _eos_ids(target, tokenizer)
    pad_token_id = next(
        (value for value in (tokenizer.pad_token_id, target.generation_config.pad_token_id) if value is not None),
        eos_ids[0] if eos_ids else 0,
    )
    generation_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": pad_token_id}
    if do_sample:
        generation_kwargs.update(
            {name: value for name, value in (("temperature", temperature), ("top_p", top_p)) if value is not None}
        )
    records = reader.records()
    previous = _read_output(output_file) if num_done else iter(())
    for index in range(num_done):
        location, record = next(records)
        if not _answers(next(previous), build_prompt(location, record), data_format):
            raise ResumeMismatchError(
                f"{output_file}:{index + 1} does not answer the prompt of {location}: the output file was written "
                "from other data or settings (`data_format`, `prompt_field`, `text_prompt_tokens`, tokenizer). Pass "
                "`resume=False` (`--no-resume`) to overwrite it, or choose another output file."
            )

    num_generated, num_new_tokens = 0, 0
    progress = logging.tqdm(total=num_records, initial=num_done, unit="record", desc="Distilling")
    try:
        with open(output_file, "a" if num_done else "w", encoding="utf-8") as handle:
            while True:
                batch = [build_prompt(location, record) for location, record in _take(records, batch_size)]
                if not batch:
                    break
                if do_sample:
                    torch.manual_seed(seed + num_done + num_generated)
                responses = _generate(target, draft, batch, generation_kwargs, eos_ids)
                lines = []
                for prompt, response in zip(batch, responses):
                    text = tokenizer.decode(response, skip_special_tokens=True)
                    record = _output_record(prompt, data_format, prompt_field, text)
                    lines.append(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                    num_new_tokens += len(response)
                # One write per batch, then flush and sync: a kill loses at most this batch (and may cut its last
                # line short, which the next run drops).
                handle.write("".join(lines))
                handle.flush()
                os.fsync(handle.fileno())
                num_generated += len(batch)
                progress.update(len(batch))
    finally:
        progress.close()
    stats = DistillStats(
        output_file=output_file,
        data_format=data_format,
        num_records=num_records,
        num_resumed=num_done,
        num_generated=num_generated,
        num_skipped=len(bad),
        num_new_tokens=num_new_tokens,
    )
    logger.info(stats.summary())
    return stats


def _take(iterator: Iterator, count: int) -> list:
    batch = []
    for item in iterator:
        batch.append(item)
        if len(batch) == count:
            break
    return batch


def _prepare_draft(draft, target: PreTrainedModel):
    if draft is None:
        return None
    if isinstance(draft, str):
        from .modeling_glide import GlideForCausalLM

        draft = GlideForCausalLM.from_pretrained(draft, target_model=target)
    elif draft.target is not target:
        raise GlideConfigError(
            "`draft` is attached to another model than the target given: load it onto this target "
            "(`GlideForCausalLM.from_pretrained(path, target_model=target)`) or pass its path."
        )
    # Only the draft's own modules move: `.to` on the whole draft would also move a target spread over devices.
    for module in draft.get_glide_model().children():
        if module is not target:
            module.to(target.device)
    return draft.eval()


@torch.no_grad()
def _generate(target, draft, batch: list[_Prompt], generation_kwargs: dict, eos_ids: list[int]) -> list[list[int]]:
    """New token ids of each prompt of `batch`, up to its end-of-sequence token."""
    input_ids, attention_mask = _left_pad(batch, generation_kwargs["pad_token_id"], target.device)
    model = draft if draft is not None else target
    sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generation_kwargs)
    return [_strip_after_eos(row, eos_ids) for row in sequences[:, input_ids.shape[1] :].tolist()]


# --- command line ----------------------------------------------------------------------------------------------------


@dataclass
class DistillArguments:
    """Flags of `glide-hf distill-data` (the arguments of `distill_data`)."""

    target: str = field(metadata={"help": "Hub id or local path of the target model whose responses are written."})
    data: list[str] = field(
        metadata={"help": "Input JSONL, JSON or Parquet files, glob patterns, or saved `datasets` folders."}
    )
    output: str = field(metadata={"help": "Output JSONL file (resumed if it exists, unless --no-resume)."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer to use; default: the target's."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest response, in tokens."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float | None = field(
        default=None, metadata={"help": "Sampling temperature; default: the target's generation config."}
    )
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling; default: the target's."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling (each batch: seed + its first record index)."})
    data_format: Literal["auto", "text", "chat", "source_target"] = field(
        default="auto", metadata={"help": "Record format; `auto` detects it from the first record."}
    )
    prompt_field: str = field(
        default="source", metadata={"help": "Field holding the prompt of source/target records (written as source)."}
    )
    text_prompt_tokens: int = field(default=128, metadata={"help": "Prompt length of `text` records, in tokens."})
    resume: bool = field(
        default=True, metadata={"help": "Continue an interrupted run that wrote --output (--no-resume overwrites)."}
    )
    skip_bad_lines: bool = field(default=False, metadata={"help": "Skip and count records without a usable prompt."})
    draft: str | None = field(
        default=None, metadata={"help": "A GLIDE draft of the target: decode with it (same output, faster)."}
    )
    target_dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto", metadata={"help": "Dtype of the target. `auto`: bfloat16 on CUDA, else float32."}
    )
    device: str | None = field(default=None, metadata={"help": "Device of the target; default: CUDA if available."})


def parse_distill_args(argv: list[str], prog: str = "glide-hf distill-data") -> DistillArguments:
    """Parse `glide-hf distill-data` flags; invalid values exit through `parser.error` (status 2)."""
    parser = HfArgumentParser(
        DistillArguments,
        prog=prog,
        description="Regenerate the responses of training data with the target model (self-distillation), in "
        "batches, resumably. Writes JSONL records in the input's format for `glide-hf train`.",
    )
    (args, remaining) = parser.parse_args_into_dataclasses(
        args=list(argv), return_remaining_strings=True, look_for_args_file=False
    )
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    if args.do_sample is False and (args.temperature is not None or args.top_p is not None):
        parser.error("--temperature and --top-p apply to sampling: add --do-sample")
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError as error:
            parser.error(f"--device {args.device}: {error}")
    if os.path.isdir(args.output):
        parser.error(f"--output {args.output} is a folder: give the JSONL file to write")
    return args


def run_cli(argv: list[str], prog: str) -> int:
    """`glide-hf distill-data`: parse the flags, run `distill_data`, print a one-line summary."""
    args = parse_distill_args(argv, prog)
    target_kwargs = {} if args.target_dtype == "auto" else {"dtype": TARGET_DTYPES[args.target_dtype]}
    with cli_logging():
        stats = distill_data(
            args.target,
            args.data,
            args.output,
            tokenizer=args.tokenizer,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_p=args.top_p,
            data_format=args.data_format,
            prompt_field=args.prompt_field,
            text_prompt_tokens=args.text_prompt_tokens,
            resume=args.resume,
            skip_bad_lines=args.skip_bad_lines,
            draft=args.draft,
            seed=args.seed,
            target_kwargs=target_kwargs,
            device=args.device,
        )
    print(f"{prog}: {stats.summary()}")
    return 0


__all__ = ["DISTILL_FORMATS", "DistillArguments", "DistillStats", "distill_data", "parse_distill_args", "run_cli"]
