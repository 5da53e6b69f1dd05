"""Self-distillation data (issue 4, item 3): `distill_data` and `glide-hf distill-data` write, for every input record,
the target's own greedy response in the record's format; a run interrupted mid-write resumes to the same file;
bad input gives clear errors."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_tokenizer import build_byte_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import glide_hf.distill
from glide_hf import (
    ChatTemplateError,
    DataFormatError,
    EmptyDatasetError,
    GlideConfigError,
    ResumeMismatchError,
)
from glide_hf.cli import main as cli_main
from glide_hf.distill import distill_data

MAX_NEW_TOKENS = 6
BATCH_SIZE = 2
TEXT_PROMPT_TOKENS = 12  # the byte tokenizer adds no BOS: 12 tokens = the first 12 characters of ASCII text

CHAT_RECORDS = [
    {"id": 0, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
    {"id": 1, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a cache"}]},
    {
        "id": 2,
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "and after two, which number comes?"},
            {"role": "assistant", "content": "three"},
        ],
    },
]
PAIR_RECORDS = [
    {"source": "Translate: cat", "target": "chat"},
    {"source": "Q: 2 + 2?", "meta": "prompt only, no target yet"},
    {"source": "A much longer source sentence, so that this batch is left-padded.", "target": "x"},
]
TEXT_RECORDS = [
    {"text": "speculative decoding drafts tokens and the target verifies them", "source": "tag"},
    {"text": "short"},
    {"text": "the draft reads the target cache of the same call"},
]
RECORDS = {"chat": CHAT_RECORDS, "source_target": PAIR_RECORDS, "text": TEXT_RECORDS}


@pytest.fixture(scope="module")
def target_dir(make_target, tmp_path_factory) -> str:
    """A tiny Llama target whose vocabulary is the byte tokenizer's, saved with that tokenizer (and its chat
    template), so the target can be loaded by path like a Hub model."""
    tokenizer = build_byte_tokenizer()
    path = tmp_path_factory.mktemp("distill_target")
    make_target("llama", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def target(target_dir):
    return AutoModelForCausalLM.from_pretrained(target_dir).eval()


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def greedy_response(target, tokenizer, prompt_ids: list[int]) -> str:
    """The target's own greedy continuation of one prompt (no batching), decoded up to its end-of-sequence token."""
    out = target.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new = out[0, len(prompt_ids) :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


def expected_record(target, tokenizer, record: dict, data_format: str) -> dict:
    expected = dict(record)
    if data_format == "chat":
        messages = record["messages"]
        prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        expected["messages"] = [*prompt, {"role": "assistant", "content": greedy_response(target, tokenizer, ids)}]
    elif data_format == "source_target":
        ids = tokenizer(record["source"])["input_ids"]
        expected["target"] = greedy_response(target, tokenizer, ids)
    else:
        prefix = record["text"][:TEXT_PROMPT_TOKENS]
        expected["text"] = prefix + greedy_response(target, tokenizer, tokenizer(prefix)["input_ids"])
    return expected


def run(target_dir, data, output, **overrides):
    kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "batch_size": BATCH_SIZE, "text_prompt_tokens": TEXT_PROMPT_TOKENS}
    return distill_data(target_dir, data, str(output), **{**kwargs, **overrides})


# --- outputs ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data_format", ["chat", "source_target", "text"])
def test_each_record_gets_the_target_greedy_response_in_its_own_format(data_format, target_dir, target, tmp_path):
    records = RECORDS[data_format]
    data = write_jsonl(tmp_path / "in.jsonl", records)
    stats = run(target_dir, data, tmp_path / "out.jsonl")
    assert (stats.data_format, stats.num_records, stats.num_generated, stats.num_resumed) == (data_format, 3, 3, 0)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    expected = [expected_record(target, tokenizer, record, data_format) for record in records]
    assert read_jsonl(tmp_path / "out.jsonl") == expected


def test_a_chat_reply_replaces_the_last_assistant_turn_or_is_appended(target_dir, tmp_path):
    run(target_dir, write_jsonl(tmp_path / "in.jsonl", CHAT_RECORDS), tmp_path / "out.jsonl")
    first, prompt_only, multi_turn = (record["messages"] for record in read_jsonl(tmp_path / "out.jsonl"))
    assert [m["role"] for m in first] == ["user", "assistant"] and first[1]["content"] != "hello there"
    assert [m["role"] for m in prompt_only] == ["system", "user", "assistant"]
    assert multi_turn[:3] == CHAT_RECORDS[2]["messages"][:3]  # earlier turns stay as the data has them
    assert len(multi_turn) == 4 and multi_turn[3]["content"] != "three"


def test_prompt_field_reads_prompts_only_files_and_writes_source_target_pairs(target_dir, target, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": r["source"], "id": i} for i, r in enumerate(PAIR_RECORDS)])
    run(target_dir, data, tmp_path / "out.jsonl", prompt_field="prompt")
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"source": r["source"], "id": i, "target": expected_record(target, tokenizer, r, "source_target")["target"]}
        for i, r in enumerate(PAIR_RECORDS)
    ]


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_json_and_parquet_inputs_give_the_jsonl_result(kind, target_dir, tmp_path):
    run(target_dir, write_jsonl(tmp_path / "in.jsonl", CHAT_RECORDS), tmp_path / "from_jsonl.jsonl")
    if kind == "json":
        data = tmp_path / "in.json"
        data.write_text(json.dumps(CHAT_RECORDS), encoding="utf-8")
    else:
        data = tmp_path / "in.parquet"
        pq.write_table(pa.Table.from_pylist(CHAT_RECORDS), data)
    run(target_dir, str(data), tmp_path / "out.jsonl")
    assert read_jsonl(tmp_path / "out.jsonl") == read_jsonl(tmp_path / "from_jsonl.jsonl")


def test_decoding_with_a_glide_draft_writes_the_same_records(target_dir, target, make_draft, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", PAIR_RECORDS)
    run(target, data, tmp_path / "plain.jsonl", tokenizer=AutoTokenizer.from_pretrained(target_dir))
    run(target, data, tmp_path / "drafted.jsonl", tokenizer=target_dir, draft=make_draft(target))
    assert read_jsonl(tmp_path / "drafted.jsonl") == read_jsonl(tmp_path / "plain.jsonl")


def test_sampling_is_reproducible_with_the_same_seed(target_dir, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", PAIR_RECORDS)
    for name in ("a", "b"):
        run(target_dir, data, tmp_path / f"{name}.jsonl", do_sample=True, temperature=1.5, seed=3)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    greedy = run(target_dir, data, tmp_path / "greedy.jsonl")
    assert greedy.num_generated == 3
    assert read_jsonl(tmp_path / "a.jsonl") != read_jsonl(tmp_path / "greedy.jsonl")


# --- resuming --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("complete_lines", [0, 1, 2])
def test_resuming_after_a_cut_short_write_gives_the_uninterrupted_file(complete_lines, target_dir, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", TEXT_RECORDS)
    full = tmp_path / "full.jsonl"
    run(target_dir, data, full, batch_size=1)
    lines = full.read_bytes().splitlines(keepends=True)
    interrupted = tmp_path / "interrupted.jsonl"
    # A killed run: some whole records, then half of the next line (no newline).
    cut = lines[complete_lines]
    interrupted.write_bytes(b"".join(lines[:complete_lines]) + cut[: len(cut) // 2])
    stats = run(target_dir, data, interrupted)
    assert (stats.num_resumed, stats.num_generated) == (complete_lines, len(lines) - complete_lines)
    assert interrupted.read_bytes() == full.read_bytes()


def test_a_run_killed_mid_way_keeps_its_finished_batches_and_resumes_to_the_uninterrupted_file(
    target_dir, tmp_path, monkeypatch
):
    data = write_jsonl(tmp_path / "in.jsonl", CHAT_RECORDS + CHAT_RECORDS)
    run(target_dir, data, tmp_path / "full.jsonl")
    calls = []
    real_generate = glide_hf.distill._generate

    def generate_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is stopped while generating its third batch
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(glide_hf.distill, "_generate", generate_then_die)
    output = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(target_dir, data, output)
    assert len(read_jsonl(output)) == 2 * BATCH_SIZE  # the two finished batches are on disk
    monkeypatch.setattr(glide_hf.distill, "_generate", real_generate)
    stats = run(target_dir, data, output)
    assert (stats.num_resumed, stats.num_generated) == (2 * BATCH_SIZE, 6 - 2 * BATCH_SIZE)
    assert output.read_bytes() == (tmp_path / "full.jsonl").read_bytes()


def test_resuming_a_complete_file_generates_nothing(target_dir, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", CHAT_RECORDS)
    run(target_dir, data, tmp_path / "out.jsonl")
    before = (tmp_path / "out.jsonl").read_bytes()
    stats = run(target_dir, data, tmp_path / "out.jsonl")
    assert (stats.num_resumed, stats.num_generated) == (3, 0)
    assert (tmp_path / "out.jsonl").read_bytes() == before


def test_no_resume_overwrites_the_output(target_dir, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", PAIR_RECORDS)
    output = tmp_path / "out.jsonl"
    output.write_text('{"unrelated": 1}\n', encoding="utf-8")
    stats = run(target_dir, data, output, resume=False)
    assert (stats.num_resumed, stats.num_generated) == (0, 3)
    assert len(read_jsonl(output)) == 3


def test_resuming_an_output_of_other_prompts_is_rejected(target_dir, tmp_path):
    output = tmp_path / "out.jsonl"
    run(target_dir, write_jsonl(tmp_path / "a.jsonl", PAIR_RECORDS), output)
    other = write_jsonl(tmp_path / "b.jsonl", [{"source": "another prompt"}] * 4)
    with pytest.raises(ResumeMismatchError, match=r"out.jsonl:1 does not answer the prompt of .*b.jsonl:1"):
        run(target_dir, other, output)


def test_resuming_a_damaged_output_names_the_line(target_dir, tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_text('{"source": "Translate: cat", "target": "x"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ResumeMismatchError, match=r"out.jsonl:2: not a JSON record"):
        run(target_dir, write_jsonl(tmp_path / "in.jsonl", PAIR_RECORDS), output)


# --- bad input -------------------------------------------------------------------------------------------------------


def test_a_malformed_jsonl_line_names_the_file_and_line(target_dir, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"source": "a"}\n\n{"source": "b"\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"in.jsonl:3: not valid JSON"):
        run(target_dir, str(data), tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()  # checked before anything is generated


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("in.parquet", b"PAR1 not really parquet PAR1", r"in.parquet` is not a readable Parquet file"),
        ("in.json", b'[{"source": "caf\xe9"}]', r"in.json:1: not UTF-8 text"),
    ],
)
def test_an_unreadable_input_file_names_the_file(name, content, message, target_dir, tmp_path):
    data = tmp_path / name
    data.write_bytes(content)
    with pytest.raises(DataFormatError, match=message):
        run(target_dir, str(data), tmp_path / "out.jsonl")


def test_a_json_file_of_json_lines_names_the_file_and_line_of_each_record(target_dir, tmp_path):
    """A `.json` file holding one record per line is read as JSON Lines: a bad record is named by its line."""
    data = tmp_path / "in.json"
    data.write_text('{"source": "a"}\n{"question": "b"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"in.json:2: "):
        run(target_dir, str(data), tmp_path / "out.jsonl")


def test_skip_bad_lines_skips_and_counts_them(target_dir, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"source": "a"}\n{"source": "b"\n{"source": 3}\n{"source": "c"}\n', encoding="utf-8")
    stats = run(target_dir, str(data), tmp_path / "out.jsonl", skip_bad_lines=True)
    assert (stats.num_records, stats.num_skipped) == (2, 2)
    assert [record["source"] for record in read_jsonl(tmp_path / "out.jsonl")] == ["a", "c"]


def test_empty_input_is_rejected(target_dir, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("\n", encoding="utf-8")
    with pytest.raises(EmptyDatasetError, match="the data files are empty"):
        run(target_dir, str(data), tmp_path / "out.jsonl")


def test_chat_data_needs_a_chat_template(target_dir, target, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", CHAT_RECORDS)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        run(target, data, tmp_path / "out.jsonl", tokenizer=build_byte_tokenizer(chat_template=None))


def test_records_of_an_unknown_shape_are_rejected(target_dir, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"question": "?"}])
    with pytest.raises(DataFormatError, match=r"in.jsonl:1: cannot tell the data format from the fields \['question"):
        run(target_dir, data, tmp_path / "out.jsonl")


def test_the_output_may_not_be_an_input(target_dir, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", PAIR_RECORDS)
    with pytest.raises(GlideConfigError, match="is also an input file"):
        run(target_dir, data, data)


# --- command line ----------------------------------------------------------------------------------------------------


def test_cli_writes_what_the_function_writes(target_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", CHAT_RECORDS)
    run(target_dir, data, tmp_path / "expected.jsonl")
    argv = [
        "distill-data",
        "--target",
        target_dir,
        "--data",
        data,
        "--output",
        str(tmp_path / "out.jsonl"),
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--batch-size",
        str(BATCH_SIZE),
        "--no-resume",
    ]
    assert cli_main(argv) == 0
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "expected.jsonl").read_bytes()
    assert "3 `chat` records" in capsys.readouterr().out


def test_cli_reports_a_glide_error_in_one_line_and_exits_1(target_dir, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text("\n", encoding="utf-8")
    argv = ["distill-data", "--target", target_dir, "--data", str(data), "--output", str(tmp_path / "out.jsonl")]
    assert cli_main(argv) == 1
    assert capsys.readouterr().err.startswith("glide-hf distill-data: error: No record in")


def test_cli_rejects_temperature_without_sampling(target_dir, tmp_path, capsys):
    argv = ["distill-data", "--target", target_dir, "--data", "x.jsonl", "--output", "y.jsonl", "--temperature", "0.7"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    assert "--do-sample" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [(["--output", "{folder}"], "is a folder: give the JSONL file"), (["--device", "bogus"], "--device bogus")],
)
def test_cli_rejects_an_output_folder_and_an_unknown_device(target_dir, tmp_path, capsys, flags, message):
    argv = ["distill-data", "--target", target_dir, "--data", "x.jsonl", "--output", "y.jsonl"]
    argv += [flag.format(folder=tmp_path) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_a_missing_tokenizer_in_one_line_and_exits_1(target_dir, tmp_path, capsys):
    """An OSError from loading (a path that does not exist) is one line with the command's name, not a traceback."""
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    argv = ["distill-data", "--target", target_dir, "--data", data, "--output", str(tmp_path / "out.jsonl")]
    assert cli_main([*argv, "--tokenizer", str(tmp_path / "no-tokenizer")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("glide-hf distill-data: error: ") and "Traceback" not in error
