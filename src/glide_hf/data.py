"""Training data for GLIDE drafts: files to tokenized rows, and rows to batches.

Pipeline (`prepare_data` runs it end to end; each step is also a public function):

1. `load_records`: JSONL, JSON or Parquet files, or a `datasets` dataset saved with `save_to_disk`, read into one
   `datasets.Dataset` of normalised records in one of three formats, detected from the fields of the first record
   of each input or forced with `data_format`:
   - `chat`: `{"messages": [{"role": ..., "content": ...}, ...]}`; loss on assistant turns only.
   - `source_target`: `{"source": ..., "target": ...}` (LongSpec's pairs; `source` may be absent); loss on the
     target only.
   - `text`: `{"text": ...}`; loss on every token.
   A malformed record raises `DataFormatError` naming the file and line (or row); with `skip_bad_lines` it is
   skipped, and the skips are counted and logged per file (again when the records come from the cache: the count
   is kept in a small JSON report beside it). A record of another format (a `text` record in chat
   data) is not malformed: it raises `DataFormatError` even with `skip_bad_lines`, since skipping it would drop
   that part of the data in silence. A file that is not readable as its type (random bytes, a truncated Parquet
   file, a damaged `save_to_disk` folder) raises `DataFormatError` naming it. Records are streamed into Arrow
   files in the `datasets` cache (keyed by the files' paths, sizes and modification times), so data larger than
   memory works and other ranks reuse what rank 0 wrote.
2. `tokenize_records`: token ids and labels (`-100` where no loss is wanted) with the target's tokenizer; samples
   over `max_length` are truncated or dropped (`overflow`), samples left without a trainable token are dropped;
   both are counted and logged (`TokenizationStats`). With packing, samples are kept whole instead.
3. `pack_rows` (optional): samples are concatenated into rows of exactly `max_length` tokens (a long sample spans
   several rows; nothing is truncated).
4. `GlideDataCollator`: right padding, and LongSpec's Anchor-Offset `position_ids` when enabled.

Chat masking. Loss positions are the characters of each assistant turn as the chat template renders it: the text
between `render(messages[:i], add_generation_prompt=True)` and `render(messages[:i + 1])` (the reply and the
template's end-of-turn markers, e.g. `<|im_end|>` or `<|eot_id|>`, which the draft must learn to predict). The full
conversation is tokenized once, and a token is trained when its character offset falls in such a span. Working on
characters rather than on token prefixes keeps the mask exact when a BPE merge crosses the boundary between the
template's header and the reply. A turn whose prefix renders differently inside the full conversation (templates
that rewrite earlier turns, such as Qwen3 dropping earlier reasoning) is left untrained, counted and logged; so is an
assistant turn before any user turn whose prefix cannot be rendered as a prompt (Transformers refuses to render an
empty conversation), logged under that cause.
Templates that mark assistant text with `{% generation %}` use Transformers' `return_assistant_tokens_mask`
instead, which is the template author's own statement of the spans.

Packing. Packed rows are one token stream: samples follow each other separated by an EOS token (added, untrained,
when a sample does not already end with one), positions run 0..max_length-1 across the row, and a token may attend
to earlier samples in its row, as in Transformers' `run_clm` and LongSpec's pre-training stage. Isolating samples
inside a row would need a block-diagonal mask in the target and in both draft attentions, which the model's
training forward does not take. Use padding (the default) where samples must not see each other, e.g. chat data.

Anchor-Offset (LongSpec section 3.2): the first `num_anchors` positions of a row are kept, the others are shifted by
one offset drawn uniformly from `[0, max_offset]` for the row, so that short training rows look like positions deep
in a long context. The target and the draft see the same positions.

What this file leaves to others: the model (`modeling_glide.py`), the Trainer set-up and CLI (`trainer.py`).
"""

import glob
import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from transformers.utils import logging

from .errors import ChatTemplateError, DataFormatError, DataNotFoundError, EmptyDatasetError, GlideConfigError
from .loss import IGNORE_INDEX

logger = logging.get_logger(__name__)

DataFormat = Literal["text", "chat", "source_target"]
OverflowPolicy = Literal["truncate", "drop"]
DATA_FORMATS: tuple[str, ...] = ("text", "chat", "source_target")
OVERFLOW_POLICIES: tuple[str, ...] = ("truncate", "drop")
# Fields that make a record one format or another, checked in this order: chat data may also carry a `text` field,
# and LongSpec's long-document records carry `source` as a tag beside `text` (only `target` marks a pair).
FORMAT_MARKER_FIELDS = (("chat", "messages"), ("source_target", "target"), ("text", "text"))
FORMAT_COLUMNS = {"text": ("text",), "chat": ("messages",), "source_target": ("source", "target")}
FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
# Bumped when the record normalisation or the tokenized columns change, so that cached Arrow files of an older
# version are not reused: the tokenized rows' cache is keyed by the records' fingerprint, since `datasets` hashes
# `_Encoder` by its fields, not its code (3: the skipped-records report is written beside the records; 4: the
# tokenized rows count untrained opening turns).
RECORDS_CACHE_VERSION = "4"
# Folder of the `datasets` cache holding one report per cached set of records that had skipped records
# (`<fingerprint>.json`), so that a reload from the cache logs the skips as the first load did.
SKIPPED_RECORDS_FOLDER = "glide_hf_skipped_records"
# Line numbers named per file in the skipped-records warning; the count covers all.
MAX_REPORTED_BAD_RECORDS = 5
# Samples per `datasets.map` batch when packing: each batch ends with at most one row shorter than `max_length`.
PACKING_BATCH_SIZE = 1000
PARQUET_BATCH_ROWS = 1024
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


# --- loading ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """One input of `load_records`: a file or a saved dataset, with what identifies its current content."""

    path: str
    kind: Literal["jsonl", "json", "parquet", "disk"]
    stamp: str  # size and modification time of a file, fingerprint of a saved dataset


def resolve_sources(paths: list[str] | str) -> list[DataSource]:
    """Expand glob patterns and classify each path by its extension (or as a saved `datasets` folder)."""
    if isinstance(paths, str):
        paths = [paths]
    sources = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataNotFoundError(f"No file matches the data pattern `{pattern}`.")
        for path in matches:
            sources.append(_classify(path))
    if not sources:
        raise DataNotFoundError("No data given: pass one or more JSONL, JSON or Parquet files or saved datasets.")
    return sources


def _classify(path: str) -> DataSource:
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, name)) for name in ("dataset_info.json", "dataset_dict.json")):
            raise DataNotFoundError(
                f"`{path}` is a folder but not a dataset written by `datasets`' `save_to_disk` (no "
                f"dataset_info.json or dataset_dict.json): pass the data files themselves, e.g. `{path}/*.jsonl`."
            )
        loaded = _load_from_disk(path)
        fingerprints = (
            [split._fingerprint for split in loaded.values()] if isinstance(loaded, dict) else [loaded._fingerprint]
        )
        return DataSource(os.path.abspath(path), "disk", ",".join(fingerprints))
    if not os.path.isfile(path):
        raise DataNotFoundError(f"The data file `{path}` does not exist.")
    kind = FILE_KINDS.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise DataFormatError(
            f"`{path}`: unsupported file type. Expected {', '.join(sorted(FILE_KINDS))} files or a folder written by "
            "`datasets`' `save_to_disk`."
        )
    stat = os.stat(path)
    return DataSource(os.path.abspath(path), kind, f"{stat.st_size}:{stat.st_mtime_ns}")


class BadRecord(Exception):
    """A record that cannot be used, with the reason: yielded by `iter_jsonl` for a line that does not parse, raised
    by the record checks, and turned by the caller into `DataFormatError` with its location, or skipped. It never
    leaves glide_hf."""


def _iter_raw(source: DataSource) -> Iterator[tuple[str, Any]]:
    """`(where, record)` pairs of one source (`where` is "line 3", "row 3" or "record 3"); a record that is not
    valid JSON comes as a `BadRecord`."""
    if source.kind == "jsonl":
        yield from _iter_jsonl(source.path)
    elif source.kind == "json":
        yield from _iter_json(source.path)
    elif source.kind == "parquet":
        yield from _iter_parquet(source.path)
    else:
        dataset = _load_saved_dataset(source.path)
        dataset = dataset.select_columns([name for name in dataset.column_names if name in _KNOWN_FIELDS])
        for row, record in enumerate(dataset):
            yield f"row {row}", record


def _unreadable_errors() -> tuple[type[Exception], ...]:
    """What pyarrow and `datasets.load_from_disk` raise on a damaged or foreign file: `ArrowInvalid` (a
    `ValueError`) for bad bytes, `OSError` for bad compression or a missing shard, `UnicodeDecodeError`, `KeyError`,
    `TypeError` and `AttributeError` for a `state.json` or `dataset_info.json` of another shape."""
    import pyarrow as pa

    return (pa.ArrowException, OSError, ValueError, KeyError, TypeError, AttributeError)


def _iter_parquet(path: str, known_fields_only: bool = True) -> Iterator[tuple[str, Any]]:
    """`(row i, record)` of a Parquet file, read batch by batch; with `known_fields_only`, only the columns the
    data formats read. A damaged or foreign file raises `DataFormatError`."""
    import pyarrow.parquet as pq

    errors = _unreadable_errors()
    row = 0
    try:
        parquet = pq.ParquetFile(path)
        known = [name for name in parquet.schema_arrow.names if name in _KNOWN_FIELDS]
        columns = (known or None) if known_fields_only else None
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
    except errors as error:
        raise _not_parquet(path, row, error) from error
    while True:
        # Pages are decoded batch by batch, so damage in the middle of a file surfaces here, not at the open.
        try:
            records = next(batches).to_pylist()
        except StopIteration:
            return
        except errors as error:
            raise _not_parquet(path, row, error) from error
        for record in records:
            yield f"row {row}", record
            row += 1


def _not_parquet(path: str, row: int, error: Exception) -> DataFormatError:
    where = f" from row {row} on" if row else ""
    reason = " ".join(str(error).split())  # pyarrow's messages span lines
    return DataFormatError(
        f"`{path}` is not a readable Parquet file{where} ({type(error).__name__}: {reason}). Check that it was "
        "written completely (not truncated or damaged in transfer) and is Parquet; data in another format needs "
        "that format's extension (.jsonl, .json)."
    )


_KNOWN_FIELDS = {"messages", "text", "source", "target"}


def iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    """Read a JSON Lines file record by record, going on past bad lines (`load_records` and `distill_data` read
    JSONL with it).

    Args:
        path (`str`):
            The file. Blank lines are passed over.

    Returns:
        `Iterator[tuple[int, Any]]`: `(line_number, record)` for each other line, numbered from 1; a line that is not
        UTF-8 text or not valid JSON comes as a `BadRecord` with the reason, for the caller to raise or skip.
    """
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                yield line_number, BadRecord(f"not UTF-8 text ({error.reason} at byte {error.start})")
                continue
            if not line:
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as error:
                yield line_number, BadRecord(f"not valid JSON ({error.msg} at column {error.colno})")


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    for line_number, record in iter_jsonl(path):
        yield f"line {line_number}", record


def _iter_json(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataFormatError(
            f"{path}:{line}: not UTF-8 text ({error.reason} at byte {error.start}), so not a JSON file. A `.json` "
            "file must hold UTF-8 JSON: a list of records or one record per line."
        ) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("{") and error.msg == "Extra data":
            # A `.json` file holding one object per line (JSON Lines under another name), as `datasets` accepts.
            yield from _iter_jsonl(path)
            return
        raise DataFormatError(
            f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno}). A `.json` file must hold "
            "a list of records or one record per line."
        ) from error
    if isinstance(document, dict):
        document = [document]
    if not isinstance(document, list):
        raise DataFormatError(f"{path}: expected a list of records, found a JSON {type(document).__name__}.")
    for index, record in enumerate(document):
        yield f"record {index}", record


def _load_from_disk(path: str):
    """`datasets.load_from_disk`, with a damaged folder (a truncated `.arrow` shard, a broken `state.json`) reported
    as `DataFormatError` instead of the reader's own exception."""
    import datasets

    try:
        return datasets.load_from_disk(path)
    except _unreadable_errors() as error:
        raise DataFormatError(
            f"`{path}` is not a readable dataset folder ({type(error).__name__}: {error}). Its files are damaged or "
            "incomplete: write it again with `save_to_disk`, or pass the original data files."
        ) from error


def _load_saved_dataset(path: str):
    import datasets

    loaded = _load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise DataFormatError(
            f"`{path}` is a DatasetDict with splits {sorted(loaded)} and no `train` split: save the split to train "
            "on by itself (`dataset_dict[name].save_to_disk(...)`)."
        )
    return loaded


def _location(path: str, where: str) -> str:
    """`path:3` for a line (as compilers name them), `path, row 3` otherwise."""
    return f"{path}:{where[5:]}" if where.startswith("line ") else f"{path}, {where}"


def detect_format(record: dict) -> str | None:
    """The data format a record's fields point to (see `FORMAT_MARKER_FIELDS`), or None."""
    for data_format, marker in FORMAT_MARKER_FIELDS:
        if record.get(marker) is not None:
            return data_format
    return None


def _normalize(record: Any, data_format: str) -> dict:
    """The record reduced to the fields of `data_format`, or `BadRecord` with the reason."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, found {type(record).__name__}")
    if data_format == "text":
        return {"text": _string_field(record, "text")}
    if data_format == "source_target":
        source = record.get("source")
        return {
            "source": "" if source is None else _string_field(record, "source"),
            "target": _string_field(record, "target"),
        }
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRecord("`messages` must be a non-empty list of {role, content} objects")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecord(f"`messages[{index}]` is a {type(message).__name__}, expected an object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadRecord(f"`messages[{index}]` needs string `role` and `content` fields")
        normalized.append({"role": role, "content": content})
    return {"messages": normalized}


def _string_field(record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        found = "no such field" if value is None else f"a {type(value).__name__}"
        raise BadRecord(f"`{name}` must be a string, found {found}")
    return value


def _peek_format(source: DataSource) -> str | None:
    """The format of the first record of `source` that is a JSON object (None for an empty source)."""
    for where, record in _iter_raw(source):
        if isinstance(record, dict):
            data_format = detect_format(record)
            if data_format is None:
                raise DataFormatError(
                    f"{_location(source.path, where)}: cannot tell the data format from the fields "
                    f"{sorted(record)}. Expected `messages` (chat), `target` with an optional `source` "
                    "(source_target) or `text` (text); or set `data_format`."
                )
            return data_format
    return None


def _other_format_error(
    source: DataSource, where: str, found: str, data_format: str, detected: bool
) -> DataFormatError:
    marker = dict(FORMAT_MARKER_FIELDS)[found]
    origin = "detected from the first record of the file" if detected else "set by `data_format` (`--data-format`)"
    return DataFormatError(
        f"{_location(source.path, where)}: a `{found}` record (it has `{marker}`), but the data format is "
        f"`{data_format}`, {origin}. One run trains on one format: split the data by format, or convert these "
        "records. `skip_bad_lines` does not skip them: it is for malformed records, not for a second format."
    )


def _generate_records(
    sources: tuple[DataSource, ...],
    data_format: str,
    skip_bad_lines: bool,
    detected: bool = False,
    report_path: str | None = None,
) -> Iterator[dict]:
    """Normalised records of all sources; bad records raise `DataFormatError` or, when skipped, are counted per
    source in the JSON report `report_path` (written after each source with skips; `_log_skipped_records` logs it).

    A record of another format than `data_format` raises `DataFormatError` whatever `skip_bad_lines` says. When
    the format was `detected` from the first records, every record must point to it (`detect_format`); when it was
    given, a record that fits it is read as it (forcing a format is how records carrying the fields of two formats
    are read as one), and a record that does not is an error if it points to another format.
    """
    num_records = 0
    report = []  # per source with skipped records: its path, their count, the first reasons
    for source in sources:
        skipped = []
        for where, record in _iter_raw(source):
            found = detect_format(record) if isinstance(record, dict) else None
            if detected and found is not None and found != data_format:
                raise _other_format_error(source, where, found, data_format, detected)
            try:
                if isinstance(record, BadRecord):
                    raise record
                normalized = _normalize(record, data_format)
            except BadRecord as reason:
                if found is not None and found != data_format:
                    raise _other_format_error(source, where, found, data_format, detected) from None
                if not skip_bad_lines:
                    raise DataFormatError(
                        f"{_location(source.path, where)}: {reason} (data format `{data_format}`). Fix the record, "
                        "or set `skip_bad_lines` to skip and count bad records."
                    ) from None
                skipped.append(f"{where}: {reason}")
                continue
            num_records += 1
            yield normalized
        if skipped:
            report.append({"path": source.path, "count": len(skipped), "shown": skipped[:MAX_REPORTED_BAD_RECORDS]})
            if report_path is not None:
                _write_json(report_path, report)
    if num_records == 0:
        raise EmptyDatasetError(
            f"No usable record in {', '.join(source.path for source in sources)}"
            + (" (every record was bad and skipped)." if skip_bad_lines else ".")
        )


def _write_json(path: str, value) -> None:
    """Write `value` as JSON to `path` through a temporary file, so that a reader never sees half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(value, handle)
    os.replace(partial, path)


def _log_skipped_records(report_path: str) -> None:
    """Log the skipped records of the report `_generate_records` wrote, whether the records were just generated or
    reloaded from the cache. No report: nothing was skipped (or the cache predates the reports)."""
    try:
        with open(report_path, encoding="utf-8") as handle:
            report = json.load(handle)
        lines = []
        for entry in report:
            more = "; ..." if entry["count"] > len(entry["shown"]) else ""
            lines.append(
                f"Skipped {entry['count']} bad records in {entry['path']} ({'; '.join(entry['shown'])}{more})."
            )
    except FileNotFoundError:
        return
    except (OSError, ValueError, TypeError, KeyError) as error:  # a damaged report must not stop the training
        logger.warning(
            f"The skipped-records report {report_path} is unreadable ({type(error).__name__}: {error}): records "
            "were skipped by `skip_bad_lines` before, but how many is unknown. Delete it and the cached records "
            "beside it (or pass another `data_cache_dir`) to count them again."
        )
        return
    for line in lines:
        logger.warning(line)


def _record_features(data_format: str):
    import datasets

    string = datasets.Value("string")
    if data_format == "chat":
        return datasets.Features({"messages": [{"role": string, "content": string}]})
    return datasets.Features({name: string for name in FORMAT_COLUMNS[data_format]})


def load_records(
    paths: list[str] | str,
    data_format: Literal["auto", "text", "chat", "source_target"] = "auto",
    skip_bad_lines: bool = False,
    cache_dir: str | None = None,
):
    """Read training records from files or saved datasets into one `datasets.Dataset`.

    Args:
        paths (`list[str]` or `str`): JSONL (`.jsonl`, `.ndjson`), JSON (`.json`: a list of records, or one per
            line) or Parquet files, glob patterns of them, or folders written by `Dataset.save_to_disk` (the `train`
            split of a `DatasetDict`).
        data_format (`str`): `"auto"` (from the first record of each input; all inputs, and every record in
            them, must agree), `"text"`, `"chat"` or `"source_target"`.
        skip_bad_lines (`bool`): skip records that are not valid JSON or lack the format's fields, counting and
            logging them per file (a reload from the cache logs them again, from a report kept in the cache),
            instead of raising `DataFormatError` at the first. A record of another format is not skipped: it
            raises `DataFormatError` naming its line and both formats, as one format per run is the contract, and
            skipping would silently drop the part of a mixed file in the other format (most of it, when the first
            record happens to be the odd one).
        cache_dir (`str`, *optional*): where `datasets` keeps the Arrow files (default: its own cache).

    Returns:
        `(datasets.Dataset, str)`: the records with the columns of the resolved format (`text`; `messages`;
        `source` and `target`), and that format.

    Raises:
        `DataNotFoundError`, `DataFormatError` (naming the file and line, or the file that is not readable as its
        type), `EmptyDatasetError`.
    """
    import datasets
    from datasets.exceptions import DatasetGenerationError

    if data_format != "auto" and data_format not in DATA_FORMATS:
        raise DataFormatError(f"`data_format` must be 'auto' or one of {DATA_FORMATS}, got {data_format!r}.")
    sources = resolve_sources(paths)
    detect = data_format == "auto"
    if detect:
        detected = {source.path: _peek_format(source) for source in sources}
        formats = {value for value in detected.values() if value is not None}
        if len(formats) > 1:
            listing = ", ".join(f"{path}: {value}" for path, value in detected.items() if value is not None)
            raise DataFormatError(
                f"The data files hold different formats ({listing}). Train on one format per run, or set "
                "`data_format` to read them all as one."
            )
        if not formats:
            raise EmptyDatasetError(
                f"No record in {', '.join(detected)}: the data is empty (or holds no JSON object)."
            )
        data_format = formats.pop()
    key = json.dumps(
        [RECORDS_CACHE_VERSION, [asdict(source) for source in sources], data_format, detect, skip_bad_lines]
    )
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
    # Keyed as the cached records: the same inputs (paths, sizes, modification times) skip the same records.
    cache_root = os.path.expanduser(cache_dir) if cache_dir else str(datasets.config.HF_DATASETS_CACHE)
    report_path = os.path.join(cache_root, SKIPPED_RECORDS_FOLDER, f"{fingerprint}.json")
    try:
        dataset = datasets.Dataset.from_generator(
            _generate_records,
            features=_record_features(data_format),
            gen_kwargs={
                "sources": tuple(sources),
                "data_format": data_format,
                "skip_bad_lines": skip_bad_lines,
                "detected": detect,
                "report_path": report_path,
            },
            cache_dir=cache_dir,
            fingerprint=fingerprint,
        )
    except DatasetGenerationError as error:
        cause = error.__cause__
        if isinstance(cause, (DataFormatError, EmptyDatasetError)):
            _log_skipped_records(report_path)  # the files read before the error, or all when none was usable
            raise cause from None
        raise
    _log_skipped_records(report_path)
    logger.info(f"Loaded {len(dataset)} `{data_format}` records from {len(sources)} input(s).")
    return dataset, data_format


# --- tokenization ----------------------------------------------------------------------------------------------------


@dataclass
class TokenizationStats:
    """What `tokenize_records` did to the samples; logged, and returned for callers and tests."""

    num_samples: int
    max_length: int
    overflow: str
    num_overflowing: int  # samples longer than `max_length` (truncated or dropped, per `overflow`)
    num_without_labels: int  # samples dropped because no token is left to train on
    num_untrained_turns: int  # chat turns whose template rendering could not be located
    num_kept: int
    num_tokens: int  # tokens in the kept samples
    # Of `num_untrained_turns`, assistant turns with no user turn before them (a conversation that opens with the
    # assistant): their cause is the turn order, not a template that rewrites earlier turns.
    num_untrained_opening_turns: int = 0

    def summary(self) -> str:
        action = "truncated" if self.overflow == "truncate" else "dropped"
        return (
            f"{self.num_samples} samples tokenized: {self.num_overflowing} longer than max_length={self.max_length} "
            f"({action}), {self.num_without_labels} without a token to train on (dropped); {self.num_kept} kept, "
            f"{self.num_tokens} tokens."
        )


def check_chat_template(tokenizer) -> None:
    """Raise `ChatTemplateError` unless `tokenizer` has a chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError(
            f"The data is in chat format (`messages`), but the tokenizer `{tokenizer.name_or_path}` has no chat "
            "template. Use the instruct model's tokenizer (`tokenizer`), set `tokenizer.chat_template`, or convert "
            "the data to `text` or `source`/`target` records."
        )


@dataclass
class _Encoder:
    """Turns a batch of normalised records into `input_ids`, `labels` and per-sample counts (a `datasets.map`
    function; a plain object so that `datasets` can hash it for its cache and send it to worker processes)."""

    tokenizer: Any
    data_format: str
    max_length: int | None  # None: samples are kept whole (packing)
    use_generation_mask: bool = False

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        if self.data_format == "text":
            encoded = self._encode_texts(batch["text"])
        elif self.data_format == "source_target":
            encoded = self._encode_pairs(batch["source"], batch["target"])
        else:
            encoded = [self._encode_chat(messages, index) for messages, index in zip(batch["messages"], indices)]
        out = {
            "input_ids": [],
            "labels": [],
            "num_tokens": [],
            "num_label_tokens": [],
            "num_untrained_turns": [],
            "num_untrained_opening_turns": [],
        }
        for ids, labels, (untrained, opening) in encoded:
            out["num_tokens"].append(len(ids))
            if self.max_length is not None:  # None when packing: `pack_rows` cuts the stream into rows instead
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            # labels[0] is never a prediction target: position t predicts labels[t + 1].
            out["num_label_tokens"].append(sum(label != IGNORE_INDEX for label in labels[1:]))
            out["num_untrained_turns"].append(untrained)
            out["num_untrained_opening_turns"].append(opening)
        return out

    def _with_eos(self, ids: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids

    def _encode_texts(self, texts: list[str]) -> list[tuple[list[int], list[int], tuple[int, int]]]:
        # One call per batch: fast tokenizers encode a batch in parallel.
        encoded = []
        for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]:
            ids = self._with_eos(list(ids))
            encoded.append((ids, list(ids), (0, 0)))
        return encoded

    def _encode_pairs(
        self, sources: list[str], targets: list[str]
    ) -> list[tuple[list[int], list[int], tuple[int, int]]]:
        # Tokenized apart, so that the boundary between prompt and target is exact (a joint tokenization may merge
        # characters across it); the special tokens (BOS) go in front of the source only.
        prompts = self.tokenizer(sources, add_special_tokens=True)["input_ids"]
        responses = self.tokenizer(targets, add_special_tokens=False)["input_ids"]
        encoded = []
        for prompt, response in zip(prompts, responses):
            response = self._with_eos(list(response))
            encoded.append((list(prompt) + response, [IGNORE_INDEX] * len(prompt) + response, (0, 0)))
        return encoded

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode_chat(self, messages: list[dict], index: int) -> tuple[list[int], list[int], tuple[int, int]]:
        """`input_ids`, `labels` and `(untrained, opening)`: the assistant turns that could not be located, and how
        many of them come before any user turn."""
        try:
            if self.use_generation_mask:
                encoded = self.tokenizer.apply_chat_template(
                    messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                )
                ids = list(encoded["input_ids"])
                labels = [tok if mask else IGNORE_INDEX for tok, mask in zip(ids, encoded["assistant_masks"])]
                return ids, labels, (0, 0)
            full = self._render(messages, add_generation_prompt=False)
        except Exception as error:  # the template's own errors (`raise_exception`, jinja) name no sample
            raise DataFormatError(
                f"Chat sample {index}: the tokenizer's chat template failed on it ({type(error).__name__}: {error})."
            ) from error
        spans, untrained, opening = [], 0, 0
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            try:
                start_text = self._render(messages[:turn], add_generation_prompt=True)
                end_text = self._render(messages[: turn + 1], add_generation_prompt=False)
                located = end_text.startswith(start_text) and full.startswith(end_text) and end_text != start_text
            except Exception:  # e.g. a template that requires a user turn first: this turn cannot be located
                located = False
            if located:
                spans.append((len(start_text), len(end_text)))
                continue
            untrained += 1
            opening += not any(earlier["role"] == "user" for earlier in messages[:turn])
        encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        labels = [
            tok if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
            for tok, offset in zip(ids, encoded["offset_mapping"])
        ]
        return ids, labels, (untrained, opening)


def tokenize_records(
    records,
    tokenizer,
    data_format: str,
    max_length: int,
    overflow: OverflowPolicy = "truncate",
    num_proc: int | None = None,
    keep_whole: bool = False,
):
    """Tokenize records from `load_records` into `input_ids` and `labels` rows.

    Args:
        records (`datasets.Dataset`): normalised records of `data_format`.
        tokenizer (`PreTrainedTokenizerBase`): the target's tokenizer; a fast tokenizer for chat data (offsets).
        data_format (`str`): `"text"`, `"chat"` or `"source_target"`.
        max_length (`int`): longest sample kept, in tokens.
        overflow (`str`): `"truncate"` longer samples to `max_length`, or `"drop"` them.
        num_proc (`int`, *optional*): worker processes for `datasets.map`.
        keep_whole (`bool`, *optional*): keep every sample whole, whatever its length (for packing: `pack_rows`
            then cuts the stream of samples into rows of `max_length`, so no token is lost); `overflow` is unused.

    Returns:
        `(datasets.Dataset, TokenizationStats)`: rows with `input_ids` and `labels` (lists of ints, `-100` where no
        loss is wanted), and the counts, which are also logged.

    Raises:
        `ChatTemplateError` for chat data and a tokenizer without a chat template, `EmptyDatasetError` when no
        sample is left.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise DataFormatError(f"`overflow` must be one of {OVERFLOW_POLICIES}, got {overflow!r}.")
    if max_length < 2:
        raise DataFormatError(f"`max_length` must be at least 2 tokens, got {max_length}.")
    use_generation_mask = False
    if data_format == "chat":
        check_chat_template(tokenizer)
        template = tokenizer.chat_template
        use_generation_mask = isinstance(template, str) and bool(_GENERATION_BLOCK.search(template))
        if not use_generation_mask and not getattr(tokenizer, "is_fast", False):
            raise ChatTemplateError(
                f"Chat data needs a fast tokenizer (character offsets locate the assistant turns), but "
                f"`{tokenizer.name_or_path}` is a slow one. Load it with `use_fast=True`."
            )
    encoder = _Encoder(tokenizer, data_format, None if keep_whole else max_length, use_generation_mask)
    encoded = records.map(
        encoder,
        batched=True,
        with_indices=True,
        remove_columns=records.column_names,
        num_proc=num_proc,
        desc="Tokenizing",
    )
    counts = encoded.select_columns(
        ["num_tokens", "num_label_tokens", "num_untrained_turns", "num_untrained_opening_turns"]
    ).with_format("numpy")
    num_tokens = np.asarray(counts["num_tokens"])
    num_label_tokens = np.asarray(counts["num_label_tokens"])
    overflowing = (num_tokens > max_length) & (not keep_whole)
    keep = num_label_tokens > 0
    if overflow == "drop":
        keep &= ~overflowing
    kept_indices = np.flatnonzero(keep)
    stats = TokenizationStats(
        num_samples=len(encoded),
        max_length=max_length,
        overflow=overflow,
        num_overflowing=int(overflowing.sum()),
        num_without_labels=int((num_label_tokens == 0).sum()),
        num_untrained_turns=int(np.asarray(counts["num_untrained_turns"]).sum()),
        num_kept=len(kept_indices),
        num_tokens=int((num_tokens if keep_whole else np.minimum(num_tokens, max_length))[kept_indices].sum()),
        num_untrained_opening_turns=int(np.asarray(counts["num_untrained_opening_turns"]).sum()),
    )
    logger.info(stats.summary())
    if stats.num_overflowing:
        logger.warning(
            f"{stats.num_overflowing} of {stats.num_samples} samples are longer than max_length={max_length} and "
            f"were {'truncated' if overflow == 'truncate' else 'dropped'} (`overflow={overflow!r}`)."
        )
    if stats.num_untrained_opening_turns:
        logger.warning(
            f"{stats.num_untrained_opening_turns} assistant turns were left untrained: they come before any user "
            "turn (the conversation starts with an assistant turn), and the chat template cannot render the "
            "conversation before them as a prompt, so their tokens could not be located. Check the order of the "
            "turns (`role`) in these records: a conversation should start with a user turn (after any system turn)."
        )
    rewritten = stats.num_untrained_turns - stats.num_untrained_opening_turns
    if rewritten:
        logger.warning(
            f"{rewritten} assistant turns were left untrained: the chat template renders the conversation before "
            "them differently from the full conversation (a template that rewrites earlier turns), so their tokens "
            "could not be located."
        )
    if stats.num_kept == 0:
        raise EmptyDatasetError(
            f"No sample is left to train on: {stats.summary()} Raise `max_length`, use `overflow='truncate'`, or "
            "check that the data has loss tokens (assistant turns, targets)."
        )
    if stats.num_kept < len(encoded):
        encoded = encoded.select(kept_indices)
    return encoded.select_columns(["input_ids", "labels"]), stats


# --- packing ---------------------------------------------------------------------------------------------------------


@dataclass
class _Packer:
    max_length: int
    eos_token_id: int | None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        stream_ids, stream_labels = [], []
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            stream_ids.extend(ids)
            stream_labels.extend(labels)
            if self.eos_token_id is not None and ids[-1] != self.eos_token_id:
                stream_ids.append(self.eos_token_id)
                stream_labels.append(IGNORE_INDEX)
        rows = {"input_ids": [], "labels": []}
        for start in range(0, len(stream_ids), self.max_length):
            labels = stream_labels[start : start + self.max_length]
            if any(label != IGNORE_INDEX for label in labels[1:]):
                rows["input_ids"].append(stream_ids[start : start + self.max_length])
                rows["labels"].append(labels)
        return rows


def pack_rows(rows, max_length: int, eos_token_id: int | None, num_proc: int | None = None):
    """Concatenate tokenized samples into rows of `max_length` tokens (see "Packing" in the module docstring).

    Each sample is followed by `eos_token_id` unless it already ends with it (the added separator is not trained).
    Every `PACKING_BATCH_SIZE` samples end with one shorter row, which the collator pads; rows without a token to
    train on are dropped.

    Args:
        rows (`datasets.Dataset`): `input_ids` and `labels` rows from `tokenize_records`.
        max_length (`int`): tokens per packed row.
        eos_token_id (`int`, *optional*): the separator; None joins samples without one.

    Returns:
        `datasets.Dataset`: packed `input_ids` and `labels` rows.
    """
    packed = rows.map(
        _Packer(max_length, eos_token_id),
        batched=True,
        batch_size=PACKING_BATCH_SIZE,
        remove_columns=rows.column_names,
        num_proc=num_proc,
        desc="Packing",
    )
    logger.info(f"Packed {len(rows)} samples into {len(packed)} rows of up to {max_length} tokens.")
    return packed


# --- batches ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnchorOffset:
    """LongSpec's Anchor-Offset position indices (arXiv 2502.17421, section 3.2).

    Args:
        num_anchors (`int`): leading positions kept as they are (the paper keeps 4: attention sinks).
        max_offset (`int`): the other positions are shifted by one offset drawn uniformly from `[0, max_offset]`
            per row. Choose it so that `max_length + max_offset` stays within the target's context length.
    """

    num_anchors: int = 4
    max_offset: int = 0

    def __post_init__(self):
        if self.num_anchors < 0 or self.max_offset < 0:
            raise GlideConfigError(
                f"Anchor-Offset needs `num_anchors` >= 0 and `max_offset` >= 0, got {self.num_anchors} and "
                f"{self.max_offset}."
            )

    def positions(self, seq_len: int, generator: torch.Generator) -> torch.LongTensor:
        """`[seq_len]` positions: `0..num_anchors-1`, then `num_anchors + offset, ...`.

        Worked example, num_anchors 2, offset 100, seq_len 5: positions 0, 1, 102, 103, 104.
        """
        offset = torch.randint(0, self.max_offset + 1, (), generator=generator)
        positions = torch.arange(seq_len)
        positions[self.num_anchors :] += offset
        return positions


@dataclass
class GlideDataCollator:
    """Pads `input_ids`/`labels` rows into a batch and adds Anchor-Offset `position_ids` when enabled.

    Rows are right-padded to the longest row (rounded up to `pad_to_multiple_of`): `attention_mask` is 0 and
    `labels` are -100 on padding. With `anchor_offset`, the offset of a row is drawn from a `torch.Generator`
    seeded with `seed`, `epoch` and a checksum of the row's tokens, so it does not depend on the order in which
    batches are built: a resumed run (Trainer skips the trained batches without collating them and restores the
    global RNG only afterwards), dataloader workers and another number of GPUs all see the offsets of an
    uninterrupted single-process run. `epoch` is advanced by the trainer (`set_epoch`), so a row gets a new offset
    each epoch (dataloader workers copy the collator when an epoch starts; persistent workers keep the first).

    Args:
        pad_token_id (`int`): id written on padding (masked out, never trained).
        anchor_offset (`AnchorOffset`, *optional*): add `position_ids` with Anchor-Offset indices.
        pad_to_multiple_of (`int`, *optional*): round the padded length up to a multiple of this.
        seed (`int`): seed of the offsets (use `TrainingArguments.seed`).
    """

    pad_token_id: int
    anchor_offset: AnchorOffset | None = None
    pad_to_multiple_of: int | None = None
    seed: int = 0
    epoch: int = field(default=0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(feature["input_ids"]) for feature in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(features)
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths)):
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(feature.get("labels", feature["input_ids"]), dtype=torch.long)
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.anchor_offset is not None:
            # Seeded from the row's own tokens, not its padded width, which depends on the other rows of the batch.
            batch["position_ids"] = torch.stack(
                [
                    self.anchor_offset.positions(width, self._row_generator(row[:length]))
                    for row, length in zip(input_ids, lengths)
                ]
            )
        return batch

    def _row_generator(self, row_ids: torch.LongTensor) -> torch.Generator:
        salt = zlib.crc32(f"{self.seed}:{self.epoch}".encode())
        checksum = zlib.crc32(row_ids.numpy().tobytes(), salt)
        return torch.Generator().manual_seed(checksum)


# --- end to end ------------------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """What `prepare_data` returns: the datasets for `Trainer`, held-out prompts, and the counts."""

    train_dataset: Any
    eval_dataset: Any | None
    eval_prompts: list[torch.LongTensor]
    data_format: str
    train_stats: TokenizationStats
    eval_stats: TokenizationStats | None = None


def prompt_of(input_ids: list[int], labels: list[int], max_tokens: int) -> torch.LongTensor:
    """The prompt part of a tokenized sample, for acceptance evaluation: the tokens before the first trained token
    (the conversation before the first reply, the source), or the first half of a sample trained throughout (text);
    at most the last `max_tokens` of it."""
    first_label = next((index for index, label in enumerate(labels) if index > 0 and label != IGNORE_INDEX), None)
    end = first_label if first_label is not None and first_label > 1 else max(1, len(input_ids) // 2)
    return torch.tensor(input_ids[max(0, end - max_tokens) : end], dtype=torch.long)


def prepare_data(
    paths: list[str] | str,
    tokenizer,
    *,
    data_format: Literal["auto", "text", "chat", "source_target"] = "auto",
    max_length: int = 1024,
    overflow: OverflowPolicy = "truncate",
    packing: bool = False,
    skip_bad_lines: bool = False,
    eval_paths: list[str] | str | None = None,
    eval_split_fraction: float = 0.0,
    num_eval_prompts: int = 0,
    eval_prompt_length: int = 256,
    seed: int = 0,
    num_proc: int | None = None,
    cache_dir: str | None = None,
) -> PreparedData:
    """Load, tokenize, split and (optionally) pack training data: `load_records`, `tokenize_records`, a seeded
    held-out split (`eval_split_fraction` of the samples, at least one) or separate `eval_paths`, then `pack_rows`.

    Args:
        paths, data_format, skip_bad_lines, cache_dir: see `load_records` (`eval_paths` likewise, same format).
        tokenizer, max_length, overflow, num_proc: see `tokenize_records`.
        packing (`bool`): pack rows (`pack_rows`) instead of keeping one sample per row.
        eval_split_fraction (`float`): fraction of the tokenized samples held out, drawn with `seed`.
        num_eval_prompts, eval_prompt_length: number and length of the held-out prompts (`prompt_of`).

    Returns:
        `PreparedData`; `eval_prompts` holds up to `num_eval_prompts` prompts (`prompt_of`) of held-out samples,
        taken before packing.
    """
    if eval_paths and eval_split_fraction:
        raise DataFormatError("Give either `eval_data` or `eval_split_fraction`, not both.")
    if not 0.0 <= eval_split_fraction < 1.0:
        raise DataFormatError(f"`eval_split_fraction` must be in [0, 1), got {eval_split_fraction}.")
    records, data_format = load_records(paths, data_format, skip_bad_lines, cache_dir)
    # Packed samples stay whole: `pack_rows` cuts the stream into rows, so a long document is not truncated.
    train, train_stats = tokenize_records(records, tokenizer, data_format, max_length, overflow, num_proc, packing)
    evaluation, eval_stats = None, None
    if eval_paths:
        eval_records, _ = load_records(eval_paths, data_format, skip_bad_lines, cache_dir)
        evaluation, eval_stats = tokenize_records(
            eval_records, tokenizer, data_format, max_length, overflow, num_proc, packing
        )
    elif eval_split_fraction:
        num_eval = max(1, round(eval_split_fraction * len(train)))
        if num_eval >= len(train):
            raise EmptyDatasetError(
                f"`eval_split_fraction={eval_split_fraction}` of {len(train)} samples leaves none to train on."
            )
        split = train.train_test_split(test_size=num_eval, seed=seed, shuffle=True)
        train, evaluation = split["train"], split["test"]
        logger.info(f"Held out {len(evaluation)} of {len(train) + len(evaluation)} samples for evaluation.")
    prompts = []
    if evaluation is not None:
        for row in evaluation.select(range(min(num_eval_prompts, len(evaluation)))):
            prompts.append(prompt_of(row["input_ids"], row["labels"], eval_prompt_length))
    if packing:
        train = pack_rows(train, max_length, tokenizer.eos_token_id, num_proc)
        if evaluation is not None:
            evaluation = pack_rows(evaluation, max_length, tokenizer.eos_token_id, num_proc)
    return PreparedData(train, evaluation, prompts, data_format, train_stats, eval_stats)


__all__ = [
    "DATA_FORMATS",
    "OVERFLOW_POLICIES",
    "AnchorOffset",
    "DataSource",
    "GlideDataCollator",
    "PreparedData",
    "BadRecord",
    "TokenizationStats",
    "check_chat_template",
    "detect_format",
    "iter_jsonl",
    "load_records",
    "pack_rows",
    "prepare_data",
    "prompt_of",
    "resolve_sources",
    "tokenize_records",
]
