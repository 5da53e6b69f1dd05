"""`glide-hf bench` end to end on the tiny Llama target of conftest.py, a GLIDE draft and an independent draft, and
the evaluation helpers of `glide_hf.bench` (issue 5)."""

import json

import pytest
import torch
from tiny_tokenizer import build_byte_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from glide_hf.bench import (
    METHODS,
    DecodingSettings,
    ModelSpec,
    evaluate,
    format_notes,
    is_looping,
    load_prompts,
)
from glide_hf.cli import main
from glide_hf.errors import DataFormatError

NUM_PROMPTS = 2
PROMPT_TOKENS = 10
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def bench_paths(tmp_path_factory, tiny_llama_path, make_draft) -> dict[str, str]:
    """A saved GLIDE draft of the tiny Llama target, a saved independent one-layer draft of its vocabulary, and a
    prompts file of token ids."""
    root = tmp_path_factory.mktemp("bench")
    make_draft(tiny_llama_path).save_pretrained(root / "draft")
    torch.manual_seed(2)
    assistant = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )
    assistant.save_pretrained(root / "assistant")
    generator = torch.Generator().manual_seed(0)
    prompts = root / "prompts.jsonl"
    with open(prompts, "w") as handle:
        for _ in range(NUM_PROMPTS):
            ids = torch.randint(3, 500, (PROMPT_TOKENS,), generator=generator).tolist()
            handle.write(json.dumps({"input_ids": ids}) + "\n")
    return {
        "root": str(root),
        "draft": str(root / "draft"),
        "assistant": str(root / "assistant"),
        "prompts": str(prompts),
        "target": tiny_llama_path,
    }


def run_bench(paths: dict, *flags: str) -> dict:
    output = f"{paths['root']}/out.json"
    code = main(
        ["bench", "--prompts", paths["prompts"], "--max-new-tokens", str(NEW_TOKENS), "--output-json", output, *flags]
    )
    assert code == 0
    with open(output) as handle:
        return json.load(handle)


def test_bench_measures_every_method_and_greedy_outputs_equal_vanilla(bench_paths, capsys):
    # No --target: the draft's config names it.
    results = run_bench(bench_paths, "--draft", bench_paths["draft"], "--assistant", bench_paths["assistant"])
    rows = {(row["method"], row["temperature"]): row for row in results["summaries"]}
    assert set(rows) == {(method, temperature) for method in METHODS for temperature in (0.0, 0.7)}
    for (method, temperature), row in rows.items():
        assert row["error"] is None
        assert row["num_prompts"] == NUM_PROMPTS
        assert row["tau"] >= 1.0
        assert row["tokens_per_second"] > 0
        if temperature == 0 and method != "vanilla":
            assert row["greedy_identical"] == NUM_PROMPTS, method
    # Plain decoding: one target forward per new token, so tau is exactly 1.
    assert rows[("vanilla", 0.0)]["tau"] == 1.0
    assert results["mismatches"] == []
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("| engine, CAPE | T=0.7 |")  # the table comes last
    assert "| assisted, independent draft | greedy | 2 |" in printed


def test_bench_runs_only_the_methods_and_temperatures_asked_for(bench_paths):
    results = run_bench(
        bench_paths, "--target", bench_paths["target"], "--methods", "vanilla,prompt_lookup", "--temperature", "0"
    )
    assert [(row["method"], row["temperature"]) for row in results["summaries"]] == [
        ("vanilla", 0.0),
        ("prompt_lookup", 0.0),
    ]


def test_bench_default_methods_leave_out_the_drafts_not_given(bench_paths):
    results = run_bench(bench_paths, "--draft", bench_paths["draft"], "--temperature", "0")
    assert [row["method"] for row in results["summaries"]] == [m for m in METHODS if m != "independent_assisted"]


def test_bench_rejects_independent_method_without_assistant(bench_paths, capsys):
    with pytest.raises(SystemExit) as raised:
        main(
            [
                "bench",
                "--prompts",
                bench_paths["prompts"],
                "--draft",
                bench_paths["draft"],
                "--methods",
                "independent_assisted",
            ]
        )
    assert raised.value.code == 2
    assert "--assistant" in capsys.readouterr().err


def test_bench_rejects_unknown_method(bench_paths, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["bench", "--prompts", bench_paths["prompts"], "--target", bench_paths["target"], "--methods", "beam"])
    assert raised.value.code == 2
    assert "unknown method(s) beam" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--draft", "/nonexistent/draft"], "--draft /nonexistent/draft: no such folder"),
        (["--target", "{empty}"], "this folder has no config.json"),
        (["--draft", "{target}"], "holds a `model_type='llama'` config, not a GLIDE draft"),
        (["--target", "{target}", "--methods", ","], "--methods names no method"),
        (["--target", "{target}", "--max_prompt_tokens", "-2"], "--max-prompt-tokens must be at least 1"),
        (["--target", "{target}", "--output_json", "{empty}"], "give a file path in an existing folder"),
        (["--target", "{target}", "--plot", "{empty}/missing/plot.png"], "give a file path in an existing folder"),
        (["--target", "{target}", "--device", "bogus"], "--device bogus"),
    ],
)
def test_bench_refuses_bad_paths_and_values_before_loading_any_model(bench_paths, tmp_path, capsys, flags, message):
    """Wrong paths, flags and output files are parser errors (status 2) up front, not a traceback after the run."""
    empty = tmp_path / "empty"
    empty.mkdir()
    flags = [flag.format(empty=empty, target=bench_paths["target"]) for flag in flags]
    with pytest.raises(SystemExit) as raised:
        main(["bench", "--prompts", bench_paths["prompts"], *flags])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_tokenizes_text_prompts_with_the_given_tokenizer(bench_paths, tmp_path):
    tokenizer_path = tmp_path / "tokenizer"
    build_byte_tokenizer().save_pretrained(tokenizer_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n\nclass Point:\n")
    results = run_bench(
        {**bench_paths, "prompts": str(prompts)},
        "--target",
        bench_paths["target"],
        "--tokenizer",
        str(tokenizer_path),
        "--methods",
        "vanilla",
        "--temperature",
        "0",
    )
    (row,) = results["summaries"]
    assert row["num_prompts"] == 2  # the empty line is skipped


@pytest.mark.slow
def test_bench_worker_processes_give_the_outputs_of_one_process(bench_paths):
    flags = ["--draft", bench_paths["draft"], "--methods", "vanilla,engine_chain", "--temperature", "0"]
    alone = run_bench(bench_paths, *flags)
    shared = run_bench(bench_paths, *flags, "--workers", "1", "--timing-prompts", "1")
    assert shared["workers"] == 1
    assert shared["calls"] == alone["calls"]
    assert {row["timed_prompts"] for row in shared["summaries"]} == {1}


def test_batched_engine_pass_gives_the_outputs_and_tau_of_batch_one_calls(bench_paths):
    # Prompts of different lengths, so that the batch is left-padded.
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (length,), generator=generator).tolist() for length in (10, 4, 7)]
    spec = ModelSpec(target=bench_paths["target"], draft=bench_paths["draft"], dtype="float32", device="cpu")
    methods = ["vanilla", "engine_chain", "engine_tree", "engine_cape"]
    settings = DecodingSettings(max_new_tokens=NEW_TOKENS, temperatures=(0.0,))
    alone = evaluate(spec, prompts, methods, settings)
    batched = evaluate(spec, prompts, methods, settings, batch_size=2, timing_prompts=1)
    assert batched.batch_size == 2 and alone.batch_size == 1

    def calls(result):
        return {(r.method, r.prompt_index): (r.tokens, r.target_forwards) for r in result.records}

    assert calls(batched) == calls(alone)
    for summary in batched.summaries:
        assert summary.tau == alone.summary(summary.method, 0.0).tau
        assert summary.greedy_identical in (None, len(prompts))
        assert summary.timed_prompts == 1  # speed from the timing pass at batch 1
    (note,) = [line for line in format_notes(batched).splitlines() if "left-padded batches of up to 2" in line]
    assert "`engine_tree` greedy" in note and "`vanilla`" not in note  # vanilla greedy, the reference, at batch 1


def test_load_prompts_reads_every_jsonl_form(tmp_path):
    tokenizer = build_byte_tokenizer()
    path = tmp_path / "prompts.jsonl"
    records = [
        {"input_ids": [5, 6, 7]},
        {"prompt": "ab"},
        {"text": "cd"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "dropped"}]},
    ]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    prompts = load_prompts(str(path), tokenizer, max_prompt_tokens=6)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompts[:3] == [[5, 6, 7], tokenizer("ab")["input_ids"], tokenizer("cd")["input_ids"]]
    assert prompts[3] == tokenizer(rendered, add_special_tokens=False)["input_ids"][-6:]


def test_load_prompts_names_the_malformed_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1,\n')
    with pytest.raises(DataFormatError, match=r"prompts\.jsonl:2: not valid JSON"):
        load_prompts(str(path))


def test_load_prompts_of_token_ids_need_no_tokenizer(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"input_ids": [4, 5]}\n')

    def loader():
        raise AssertionError("the tokenizer must not be loaded for token-id prompts")

    assert load_prompts(str(path), tokenizer_loader=loader) == [[4, 5]]


def test_is_looping_detects_a_repeated_block_in_the_last_half():
    assert is_looping([1, 2, 3, 4] + [7, 8] * 4, min_tokens=8)
    assert is_looping([9] * 20)


def test_is_looping_rejects_varied_and_short_continuations():
    assert not is_looping(list(range(40)))
    assert not is_looping([1, 2, 3, 4, 5, 6, 7, 8] + [7, 8, 7, 8, 7, 9], min_tokens=8)  # the last block differs
    assert not is_looping([5] * 10)  # shorter than the default 16 tokens


def test_bench_names_the_target_a_draft_names_when_it_is_missing(bench_paths, tmp_path, capsys):
    """A draft whose config names a target folder that is not there (moved, or a relative path from elsewhere):
    a parser error that names that target, before any model loads."""
    from glide_hf import GlideConfig

    config = GlideConfig.from_pretrained(bench_paths["draft"])
    config.target_name_or_path = str(tmp_path / "moved-target")
    moved = tmp_path / "draft"
    moved.mkdir()
    config.save_pretrained(moved)
    with pytest.raises(SystemExit) as raised:
        main(["bench", "--prompts", bench_paths["prompts"], "--draft", str(moved)])
    assert raised.value.code == 2
    assert f"--draft {moved} names the target {tmp_path / 'moved-target'}: no such folder" in capsys.readouterr().err
