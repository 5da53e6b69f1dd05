"""Training data (`glide_hf.data`): formats and their loss masks, file types, overflow, padding, packing,
Anchor-Offset positions, and the errors for bad input.

The tokenizer is byte-level (one token per ASCII character, see tiny_tokenizer.py), so expected token ids are
written from the text itself.
"""

import json
import logging

import datasets
import pytest
import torch
from tiny_tokenizer import END_OF_TURN, GENERATION_CHAT_TEMPLATE, build_byte_tokenizer

from glide_hf import ChatTemplateError, DataFormatError, DataNotFoundError, EmptyDatasetError
from glide_hf.data import (
    AnchorOffset,
    GlideDataCollator,
    load_records,
    pack_rows,
    prepare_data,
    tokenize_records,
)

IGNORE = -100
EOS_ID = 2
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello!"},
    {"role": "user", "content": "and?"},
    {"role": "assistant", "content": "done"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture
def write_jsonl(tmp_path):
    def _write(records, name="data.jsonl", raw_lines=None):
        path = tmp_path / name
        lines = [json.dumps(record) for record in records] if raw_lines is None else raw_lines
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    return _write


@pytest.fixture
def load(tmp_path):
    """`load_records` with a per-test Arrow cache."""

    def _load(paths, **kwargs):
        return load_records(paths, cache_dir=str(tmp_path / "cache"), **kwargs)

    return _load


def byte_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(tokenizer, load, path, max_length=256, overflow="truncate"):
    records, data_format = load(path)
    return tokenize_records(records, tokenizer, data_format, max_length, overflow)


# --- formats ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"text": "abc", "meta": {"x": 1}}, "text"),
        ({"messages": CONVERSATION, "text": "ignored"}, "chat"),
        ({"source": "q", "target": "a"}, "source_target"),
        ({"target": "only a target"}, "source_target"),
        ({"source": "code", "text": "a long-document record with a source tag"}, "text"),
    ],
)
def test_format_is_detected_from_the_fields(write_jsonl, load, record, expected):
    _, data_format = load(write_jsonl([record]))
    assert data_format == expected


def test_data_format_flag_overrides_detection(write_jsonl, load):
    records, data_format = load(write_jsonl([{"text": "abc", "target": "xyz"}]), data_format="text")
    assert data_format == "text"
    assert records[0] == {"text": "abc"}


def test_text_sample_is_trained_on_every_token_and_ends_with_eos(tokenizer, write_jsonl, load):
    rows, _ = encode(tokenizer, load, write_jsonl([{"text": "hello world"}]))
    expected = byte_ids(tokenizer, "hello world") + [EOS_ID]
    assert rows[0]["input_ids"] == expected
    assert rows[0]["labels"] == expected


def test_source_target_labels_cover_the_target_only(tokenizer, write_jsonl, load):
    rows, _ = encode(tokenizer, load, write_jsonl([{"source": "2+2=", "target": "4"}]))
    prompt, response = byte_ids(tokenizer, "2+2="), byte_ids(tokenizer, "4") + [EOS_ID]
    assert rows[0]["input_ids"] == prompt + response
    assert rows[0]["labels"] == [IGNORE] * len(prompt) + response


def _expected_chat(tokenizer, messages):
    """Token ids of the test template's rendering, and labels on assistant content and its end-of-turn marker."""
    special = {role: tokenizer.convert_tokens_to_ids(f"<|{role}|>") for role in ("system", "user", "assistant")}
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    ids, labels = [], []
    for message in messages:
        content = byte_ids(tokenizer, message["content"]) + [end]
        ids += [special[message["role"]]] + content
        trained = message["role"] == "assistant"
        labels += [IGNORE] + (content if trained else [IGNORE] * len(content))
    return ids, labels


def test_chat_labels_are_exactly_the_assistant_turns(tokenizer, write_jsonl, load):
    rows, stats = encode(tokenizer, load, write_jsonl([{"messages": CONVERSATION}]))
    expected_ids, expected_labels = _expected_chat(tokenizer, CONVERSATION)
    assert rows[0]["input_ids"] == expected_ids
    assert rows[0]["labels"] == expected_labels
    assert stats.num_untrained_turns == 0


def test_chat_labels_from_generation_template_equal_prefix_rendering(tokenizer, write_jsonl, load):
    path = write_jsonl([{"messages": CONVERSATION}])
    rows, _ = encode(tokenizer, load, path)
    marked = build_byte_tokenizer(GENERATION_CHAT_TEMPLATE)
    marked_rows, _ = encode(marked, load, path)
    assert marked_rows[0]["input_ids"] == rows[0]["input_ids"]
    assert marked_rows[0]["labels"] == rows[0]["labels"]


def test_chat_turn_rewritten_by_the_template_is_left_untrained_and_counted(write_jsonl, load, caplog):
    # Like Qwen3's template dropping earlier reasoning: earlier assistant turns render as "...".
    rewriting = build_byte_tokenizer(
        "{% for m in messages %}<|{{ m.role }}|>"
        "{% if m.role == 'assistant' and not loop.last %}...{% else %}{{ m.content }}{% endif %}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with caplog.at_level(logging.WARNING, logger="glide_hf"):
        rows, stats = encode(rewriting, load, write_jsonl([{"messages": CONVERSATION[1:]}]))
    assert stats.num_untrained_turns == 1 and stats.num_untrained_opening_turns == 0
    assert "1 assistant turns were left untrained: the chat template renders the conversation" in caplog.text
    trained = [token for token, label in zip(rows[0]["input_ids"], rows[0]["labels"]) if label != IGNORE]
    assert rewriting.decode(trained) == "done" + END_OF_TURN


def test_chat_turn_before_any_user_turn_is_reported_as_such(tokenizer, write_jsonl, load, caplog):
    # New-user audit: a conversation opening with an assistant turn was reported as "a template that rewrites
    # earlier turns". Transformers refuses to render the empty conversation before it, so it cannot be located.
    messages = [
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "done"},
    ]
    with caplog.at_level(logging.WARNING, logger="glide_hf"):
        rows, stats = encode(tokenizer, load, write_jsonl([{"messages": messages}]))
    assert stats.num_untrained_turns == stats.num_untrained_opening_turns == 1
    assert "1 assistant turns were left untrained: they come before any user turn" in caplog.text
    assert "rewrites earlier turns" not in caplog.text
    trained = [token for token, label in zip(rows[0]["input_ids"], rows[0]["labels"]) if label != IGNORE]
    assert tokenizer.decode(trained) == "done" + END_OF_TURN  # the later turn still trains


def test_chat_data_with_a_tokenizer_without_chat_template_is_an_error(write_jsonl, load):
    records, data_format = load(write_jsonl([{"messages": CONVERSATION}]))
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tokenize_records(records, build_byte_tokenizer(chat_template=None), data_format, 256)


def test_chat_without_assistant_turn_is_dropped_as_untrainable(tokenizer, write_jsonl, load):
    path = write_jsonl([{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}])
    rows, stats = encode(tokenizer, load, path)
    assert (stats.num_without_labels, stats.num_kept, len(rows)) == (1, 1, 1)


@pytest.mark.parametrize("kind", ["json", "json_lines_in_json", "parquet", "saved_dataset"])
def test_other_inputs_load_the_same_records_as_jsonl(tmp_path, write_jsonl, load, kind):
    records = [{"text": f"sample {index}"} for index in range(5)]
    expected, _ = load(write_jsonl(records))
    if kind == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(records))
    elif kind == "json_lines_in_json":
        path = write_jsonl(records, name="lines.json")
    elif kind == "parquet":
        path = tmp_path / "data.parquet"
        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    loaded, data_format = load(str(path))
    assert data_format == "text"
    assert loaded.to_list() == expected.to_list()


def test_several_files_and_glob_patterns_are_concatenated(tmp_path, write_jsonl, load):
    write_jsonl([{"text": "a"}], name="part-0.jsonl")
    write_jsonl([{"text": "b"}, {"text": "c"}], name="part-1.jsonl")
    records, _ = load(str(tmp_path / "part-*.jsonl"))
    assert records["text"] == ["a", "b", "c"]


def test_files_of_different_formats_are_an_error(write_jsonl, load):
    text = write_jsonl([{"text": "a"}], name="text.jsonl")
    chat = write_jsonl([{"messages": CONVERSATION}], name="chat.jsonl")
    with pytest.raises(DataFormatError, match="different formats"):
        load([text, chat])


# --- bad input -------------------------------------------------------------------------------------------------------

BAD_LINES = ['{"text": "fine"}', '{"text": "also fine"}', '{"text": broken', '{"text": "ok"}', '["a list"]', "", "{}"]


def test_malformed_jsonl_line_error_names_file_and_line(write_jsonl, load):
    path = write_jsonl(None, raw_lines=BAD_LINES)
    with pytest.raises(DataFormatError, match=rf"{path}:3: not valid JSON"):
        load(path)


def test_record_without_the_format_field_error_names_file_and_line(write_jsonl, load):
    path = write_jsonl([{"text": "fine"}, {"body": "no text field"}])
    with pytest.raises(DataFormatError, match=rf"{path}:2: `text` must be a string, found no such field"):
        load(path)


def test_skip_bad_lines_skips_and_counts_them(write_jsonl, load, caplog):
    path = write_jsonl(None, raw_lines=BAD_LINES)
    with caplog.at_level(logging.WARNING, logger="glide_hf"):
        records, _ = load(path, skip_bad_lines=True)
    assert records["text"] == ["fine", "also fine", "ok"]
    assert f"Skipped 3 bad records in {path} (line 3: not valid JSON" in caplog.text
    assert "line 5: expected a JSON object" in caplog.text and "line 7: `text` must be a string" in caplog.text


def test_skip_bad_lines_logs_the_skips_again_when_the_records_come_from_the_cache(write_jsonl, load, caplog):
    # New-user audit: an identical second run reloaded the records from the cache and said nothing about the skips.
    path = write_jsonl(None, raw_lines=BAD_LINES)
    load(path, skip_bad_lines=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="glide_hf"):
        records, _ = load(path, skip_bad_lines=True)
    assert records["text"] == ["fine", "also fine", "ok"]
    assert f"Skipped 3 bad records in {path} (line 3: not valid JSON" in caplog.text
    assert "line 7: `text` must be a string" in caplog.text


def test_a_cache_without_a_readable_skip_report_still_loads(write_jsonl, load, tmp_path, caplog):
    path = write_jsonl(None, raw_lines=BAD_LINES)
    load(path, skip_bad_lines=True)
    (report,) = (tmp_path / "cache" / "glide_hf_skipped_records").iterdir()
    report.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="glide_hf"):
        records, _ = load(path, skip_bad_lines=True)
    assert records["text"] == ["fine", "also fine", "ok"]
    assert "skipped-records report" in caplog.text and "unreadable" in caplog.text
    report.unlink()  # a cache written before the reports existed
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="glide_hf"):
        records, _ = load(path, skip_bad_lines=True)
    assert records["text"] == ["fine", "also fine", "ok"] and "Skipped" not in caplog.text


def test_record_of_another_format_is_an_error_even_with_skip_bad_lines(write_jsonl, load):
    # Regression: the format came from the first record only, and skip_bad_lines then skipped every text record of
    # a mostly-text file whose first record was chat, with only a warning.
    path = write_jsonl([{"messages": CONVERSATION}] + [{"text": f"sample {index}"} for index in range(5)])
    with pytest.raises(
        DataFormatError, match=rf"{path}:2: a `text` record .* data format is `chat`, detected from the first record"
    ):
        load(path, skip_bad_lines=True)


def test_record_with_the_fields_of_another_format_is_an_error_when_detected(write_jsonl, load):
    path = write_jsonl([{"text": "a"}, {"text": "b", "target": "c"}])
    with pytest.raises(DataFormatError, match=rf"{path}:2: a `source_target` record \(it has `target`\)"):
        load(path)
    records, _ = load(path, data_format="text")
    assert records["text"] == ["a", "b"]


def test_record_of_another_format_is_an_error_with_a_forced_format(write_jsonl, load):
    path = write_jsonl([{"messages": CONVERSATION}, {"text": "plain"}, {"messages": CONVERSATION}])
    with pytest.raises(DataFormatError, match=rf"{path}:2: a `text` record .* `chat`, set by `data_format`"):
        load(path, data_format="chat", skip_bad_lines=True)


def _damaged_parquet(path, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": [f"sample number {index}" for index in range(3000)]})
    pq.write_table(table, str(path), row_group_size=1000)
    data = bytearray(path.read_bytes())
    if damage == "random_bytes":
        data = bytearray(range(256)) * 4
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    else:  # the pages of the last row group overwritten: the footer still reads, the rows do not
        column = pq.ParquetFile(str(path)).metadata.row_group(2).column(0)
        start = column.dictionary_page_offset or column.data_page_offset
        data[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("data_format", ["auto", "text"])
@pytest.mark.parametrize("damage", ["random_bytes", "truncated", "empty", "damaged_row_group"])
def test_unreadable_parquet_file_is_a_data_format_error(tmp_path, load, damage, data_format):
    path = tmp_path / "data.parquet"
    _damaged_parquet(path, damage)
    rows = " from row 1024 on" if damage == "damaged_row_group" else ""
    with pytest.raises(DataFormatError, match=rf"`{path}` is not a readable Parquet file{rows} \("):
        load(str(path), data_format=data_format)


def test_json_file_that_is_not_utf8_is_a_data_format_error(tmp_path, load):
    path = tmp_path / "data.json"
    path.write_bytes(b'[{"text": "ok"},\n {"text": "\xff\xfe"}]')
    with pytest.raises(DataFormatError, match=rf"{path}:2: not UTF-8 text"):
        load(str(path))


@pytest.mark.parametrize("damage", ["truncated_shard", "broken_state", "state_of_another_shape"])
def test_damaged_saved_dataset_is_a_data_format_error(tmp_path, load, damage):
    path = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": f"sample {index}"} for index in range(5)]).save_to_disk(str(path))
    if damage == "truncated_shard":
        shard = next(path.glob("*.arrow"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        (path / "state.json").write_text("{oops" if damage == "broken_state" else "[]")
    with pytest.raises(DataFormatError, match=rf"`{path}` is not a readable dataset folder"):
        load(str(path))


def test_empty_data_file_is_an_error(write_jsonl, load):
    path = write_jsonl(None, raw_lines=[""])
    with pytest.raises(EmptyDatasetError, match="empty"):
        load(path)


def test_file_of_only_bad_lines_in_skip_mode_is_an_empty_dataset(write_jsonl, load):
    path = write_jsonl(None, raw_lines=["{oops", '{"x": 1}'])
    with pytest.raises(EmptyDatasetError, match="every record was bad"):
        load(path, data_format="text", skip_bad_lines=True)


def test_missing_file_and_unsupported_type_are_errors(tmp_path, load):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load(str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("text\nabc\n")
    with pytest.raises(DataFormatError, match="unsupported file type"):
        load(str(tmp_path / "data.csv"))


def test_plain_folder_error_names_a_glob_of_its_files(tmp_path, load):
    # New-user audit: the suggested pattern printed a literal `{path}/*.jsonl`.
    folder = tmp_path / "jsonl_files"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text('{"text": "abc"}\n')
    with pytest.raises(DataNotFoundError, match="is a folder but not a dataset") as raised:
        load(str(folder))
    assert f"e.g. `{folder}/*.jsonl`" in str(raised.value)


def test_every_sample_dropped_is_an_error(tokenizer, write_jsonl, load):
    with pytest.raises(EmptyDatasetError, match="No sample is left"):
        encode(tokenizer, load, write_jsonl([{"text": "longer than four"}]), max_length=4, overflow="drop")


# --- overflow, padding, packing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_samples_over_max_length_are_truncated_or_dropped_and_counted(tokenizer, write_jsonl, load, caplog, overflow):
    path = write_jsonl([{"text": "x" * 3}, {"text": "y" * 20}, {"text": "z" * 30}])
    with caplog.at_level(logging.INFO, logger="glide_hf"):
        rows, stats = encode(tokenizer, load, path, max_length=10, overflow=overflow)
    assert stats.num_overflowing == 2
    action = "truncated" if overflow == "truncate" else "dropped"
    assert f"2 of 3 samples are longer than max_length=10 and were {action}" in caplog.text
    if overflow == "truncate":
        assert [len(ids) for ids in rows["input_ids"]] == [4, 10, 10]
        assert rows[1]["input_ids"] == byte_ids(tokenizer, "y" * 10)  # cut, so no EOS
    else:
        assert rows["input_ids"] == [byte_ids(tokenizer, "xxx") + [EOS_ID]]


def test_collator_right_pads_with_masked_labels():
    collator = GlideDataCollator(pad_token_id=0)
    batch = collator([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert "position_ids" not in batch


def test_collator_pads_to_a_multiple():
    batch = GlideDataCollator(pad_token_id=0, pad_to_multiple_of=4)([{"input_ids": [5] * 5, "labels": [5] * 5}])
    assert batch["input_ids"].shape == (1, 8)
    assert batch["attention_mask"].sum() == 5


def test_packing_fills_rows_with_the_sample_stream(tokenizer, write_jsonl, load):
    rows, _ = encode(tokenizer, load, write_jsonl([{"text": "a" * 5}, {"text": "b" * 9}, {"text": "c" * 2}]))
    packed = pack_rows(rows, max_length=8, eos_token_id=EOS_ID)
    stream = byte_ids(tokenizer, "a" * 5) + [EOS_ID] + byte_ids(tokenizer, "b" * 9) + [EOS_ID]
    stream += byte_ids(tokenizer, "cc") + [EOS_ID]
    assert [len(row) for row in packed["input_ids"]] == [8, 8, 3]
    assert sum(packed["input_ids"], []) == stream
    assert sum(packed["labels"], []) == stream


def test_packing_keeps_samples_longer_than_a_row_whole(tokenizer, write_jsonl, tmp_path):
    """With packing, a sample longer than `max_length` spans several rows instead of being truncated first: every
    token of every sample is in the packed rows, in order."""
    texts = ["a" * 30, "b" * 5, "c" * 19]
    path = write_jsonl([{"text": text} for text in texts])
    data = prepare_data(path, tokenizer, max_length=8, packing=True, cache_dir=str(tmp_path / "cache"))
    stream = sum((byte_ids(tokenizer, text) + [EOS_ID] for text in texts), [])
    assert all(len(row) <= 8 for row in data.train_dataset["input_ids"])
    packed = sum(data.train_dataset["input_ids"], [])
    # A last row holding only the final separator has nothing to train on and is dropped.
    assert packed == stream[: len(packed)] and stream[len(packed) :] in ([], [EOS_ID])
    assert data.train_stats.num_overflowing == 0 and data.train_stats.num_tokens == len(stream)
    unpacked = prepare_data(path, tokenizer, max_length=8, cache_dir=str(tmp_path / "cache"))
    assert unpacked.train_stats.num_overflowing == 2  # without packing: the a and c samples are truncated


def test_packing_separates_samples_with_an_untrained_eos(tokenizer, write_jsonl, load):
    rows, _ = encode(tokenizer, load, write_jsonl([{"messages": CONVERSATION[1:3]}] * 2))
    packed = pack_rows(rows, max_length=1000, eos_token_id=EOS_ID)
    sample_ids, sample_labels = rows[0]["input_ids"], rows[0]["labels"]
    assert packed[0]["input_ids"] == (sample_ids + [EOS_ID]) * 2
    assert packed[0]["labels"] == (sample_labels + [IGNORE]) * 2


# --- Anchor-Offset ---------------------------------------------------------------------------------------------------


def anchor_batch(seed=0, epoch=0, rows=None, num_anchors=3, max_offset=1000):
    rows = rows or [list(range(10 + index, 30 + index)) for index in range(16)]
    collator = GlideDataCollator(pad_token_id=0, anchor_offset=AnchorOffset(num_anchors, max_offset), seed=seed)
    collator.set_epoch(epoch)
    return collator([{"input_ids": ids, "labels": ids} for ids in rows])["position_ids"]


def test_anchor_offset_keeps_anchors_and_shifts_the_rest_by_one_offset_per_row():
    positions = anchor_batch(num_anchors=3, max_offset=1000)
    arange = torch.arange(20)
    assert torch.equal(positions[:, :3], arange[:3].expand(16, 3))
    offsets = positions[:, 3:] - arange[3:]
    assert torch.equal(offsets, offsets[:, :1].expand_as(offsets))  # one offset per row
    assert ((offsets >= 0) & (offsets <= 1000)).all()
    assert len(set(offsets[:, 0].tolist())) > 1  # drawn per row, not per batch


def test_anchor_offset_is_reproducible_under_a_seed():
    assert torch.equal(anchor_batch(seed=0), anchor_batch(seed=0))
    assert not torch.equal(anchor_batch(seed=0), anchor_batch(seed=1))
    assert not torch.equal(anchor_batch(epoch=0), anchor_batch(epoch=1))


def test_anchor_offset_of_a_row_does_not_depend_on_its_batch():
    rows = [list(range(10 + index, 30 + index)) for index in range(4)]
    alone = anchor_batch(rows=rows[:1])
    with_longer_rows = anchor_batch(rows=rows[:1] + [list(range(50))])
    assert torch.equal(with_longer_rows[0, :20], alone[0])


def test_anchor_offset_zero_max_offset_gives_plain_positions():
    assert torch.equal(anchor_batch(max_offset=0), torch.arange(20).expand(16, 20))


# --- end to end ------------------------------------------------------------------------------------------------------


def test_prepare_data_holds_out_a_seeded_split_with_prompts(tokenizer, write_jsonl, tmp_path):
    path = write_jsonl([{"source": f"question {index}?", "target": f"answer {index}"} for index in range(20)])
    kwargs = {"eval_split_fraction": 0.2, "num_eval_prompts": 2, "seed": 3, "cache_dir": str(tmp_path / "cache")}
    data = prepare_data(path, tokenizer, max_length=64, **kwargs)
    again = prepare_data(path, tokenizer, max_length=64, **kwargs)
    assert (len(data.train_dataset), len(data.eval_dataset)) == (16, 4)
    assert data.eval_dataset["input_ids"] == again.eval_dataset["input_ids"]
    # A prompt is the source part of a held-out sample.
    assert [tokenizer.decode(prompt).startswith("question") for prompt in data.eval_prompts] == [True, True]
    assert all(tokenizer.decode(prompt).endswith("?") for prompt in data.eval_prompts)
