"""The model card generator (issue 6, item 3): front matter the Hub parses, training data and settings, measured
tau/speedup from a results dict or JSON file, clear errors for unusable inputs, and `model_cards/template.md` in step
with what the generator writes."""

import ast
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard
from transformers import LlamaConfig

import glide_hf.model_card
from glide_hf import GlideConfig, GlideForCausalLM, ModelCardError
from glide_hf.model_card import MODEL_CARD_TAGS, glide_model_card, write_model_card

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_NAME = "Qwen/Qwen2.5-7B-Instruct"
BENCHMARK = {
    "device": "NVIDIA H200",
    "torch": "2.11.0",
    "transformers": "5.24.0",
    "command": "python examples/fast_generate.py --strategy tree",
    "results": [
        {
            "dataset": "mt-bench",
            "draft_strategy": "chain",
            "num_draft_tokens": 5,
            "temperature": 0.0,
            "tokens_per_target_forward": 3.456,
            "tokens_per_second": 120.0,
            "baseline_tokens_per_second": 40.0,
        },
        {"dataset": "mt-bench", "strategy": "tree", "tree_widths": [4, 16, 16], "tau": 4.1, "speedup": 2.5},
    ],
}
DRY_RUN = {
    "glide": {"target": TARGET_NAME, "data": ["data/SlimPajama-6B/*.parquet"], "max_length": 1024, "packing": True,
              "anchor_offset": True, "sliding_window": None},
    "training": {"learning_rate": 0.0005, "max_steps": 10000, "bf16": True, "logging_steps": 10},
    "resolved": {"target_dtype": "bfloat16"},
}  # fmt: skip


@pytest.fixture(scope="module")
def draft() -> GlideForCausalLM:
    """A draft without a target: the card reads `model.config` only."""
    target_config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    )
    config = GlideConfig(target_config=target_config, target_name_or_path=TARGET_NAME, sliding_window=8)
    return GlideForCausalLM(config)


def front_matter(card: ModelCard) -> dict:
    """The YAML front matter as the Hub parses it (from the card's text, not from the object that wrote it)."""
    return ModelCard(card.content).data.to_dict()


def section(card: ModelCard, heading: str) -> str:
    """The text of the `## heading` section."""
    match = re.search(rf"^## {heading}\n(.*?)(?=^## |\Z)", card.content, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no `## {heading}` section"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row of `text` (header and body, no separator)."""
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in rows]


def test_front_matter_names_target_library_license_tags_and_datasets(draft):
    card = glide_model_card(
        draft, tags=["qwen2"], training={"datasets": ["DKYoon/SlimPajama-6B"]}, license="apache-2.0"
    )
    metadata = front_matter(card)
    assert metadata["base_model"] == TARGET_NAME
    assert metadata["library_name"] == "transformers"
    assert metadata["license"] == "apache-2.0"
    assert metadata["tags"] == [*MODEL_CARD_TAGS, "qwen2"]
    assert metadata["datasets"] == ["DKYoon/SlimPajama-6B"]


def test_card_without_inputs_has_no_license_or_datasets_and_says_nothing_was_measured(draft):
    card = glide_model_card(draft)
    metadata = front_matter(card)
    assert "license" not in metadata and "datasets" not in metadata
    assert "Not recorded" in section(card, "Training")
    assert "Not measured" in section(card, "Results")


def test_draft_settings_table_shows_the_config(draft):
    rows = dict(table_rows(section(glide_model_card(draft), "Draft settings"))[1:])
    assert rows["self-attention window (`sliding_window`)"] == "8 tokens"
    assert rows["draft tokens per round (`num_draft_tokens`)"] == str(draft.config.num_draft_tokens)
    assert rows["final norm (`final_norm`)"] == "yes"
    assert rows["draft vocabulary (`draft_vocab_size`)"] == "the whole vocabulary"


def test_draft_settings_table_shows_a_draft_vocabulary(make_target, make_draft):
    draft = make_draft(make_target()).set_draft_vocabulary([1, 2, 3])
    rows = dict(table_rows(section(glide_model_card(draft), "Draft settings"))[1:])
    vocab = draft.config.vocab_size
    assert rows["draft vocabulary (`draft_vocab_size`)"] == f"3 of {vocab} token ids (the engine only)"


def test_results_file_fills_tau_speedup_and_the_measurement_line(draft, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(BENCHMARK))
    results = section(glide_model_card(draft, results=str(path)), "Results")
    header, chain, tree = table_rows(results)
    assert header == [
        "data", "strategy", "draft tokens", "tree widths", "temperature", "tau", "speedup", "tokens/s",
        "baseline tokens/s",
    ]  # fmt: skip
    # `tokens_per_target_forward` is read as tau; the speedup is derived from the two throughputs.
    assert chain == ["mt-bench", "chain", "5", "", "0", "3.46", "3.00x", "120.0", "40.0"]
    assert tree == ["mt-bench", "tree", "", "4, 16, 16", "", "4.10", "2.50x", "", ""]
    assert "device: NVIDIA H200; torch: 2.11.0; transformers: 5.24.0" in results
    assert "command: python examples/fast_generate.py --strategy tree" in results


def test_results_dict_gives_the_same_card_as_its_json_file(draft, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(BENCHMARK))
    assert glide_model_card(draft, results=BENCHMARK).content == glide_model_card(draft, results=path).content


def test_train_output_json_gives_tau_from_the_acceptance_metric(draft, tmp_path):
    # What `glide-hf train --output-json` writes: the run's final metrics under `metrics`.
    path = tmp_path / "train.json"
    path.write_text(json.dumps({
        "output_dir": "runs/stage1",
        "metrics": {"train_loss": 2.1, "eval_loss": 1.875, "eval_tokens_per_target_forward": 2.5, "epoch": 1.0},
    }))  # fmt: skip
    header, row = table_rows(section(glide_model_card(draft, results=path), "Results"))
    assert header == ["tau", "eval loss"]
    assert row == ["2.50", "1.875"]


def test_training_settings_and_stages_from_dry_run_json(draft, tmp_path):
    path = tmp_path / "training.json"
    path.write_text(json.dumps({
        "datasets": ["DKYoon/SlimPajama-6B"],
        "stages": [
            {**DRY_RUN, "name": "Stage 1: short text"},
            {"name": "Stage 3: long chain-of-thought", "datasets": ["amphora/QwQ-LongCoT-130K"],
             "learning_rate": 5e-6},
        ],
    }))  # fmt: skip
    card = glide_model_card(draft, training=path)
    training = section(card, "Training")
    assert "### Stage 1: short text" in training and "### Stage 3: long chain-of-thought" in training
    stage1 = training.split("### Stage 1: short text")[1].split("### Stage 3")[0]
    settings = dict(table_rows(stage1)[1:])
    assert settings["`target`"] == TARGET_NAME
    assert settings["`packing`"] == "yes"
    assert settings["`learning_rate`"] == "0.0005"
    # Only the main settings of a dry run are kept, and unset ones are left out.
    assert "`logging_steps`" not in settings and "`sliding_window`" not in settings
    assert "Data: data/SlimPajama-6B/*.parquet." in stage1
    assert front_matter(card)["datasets"] == ["DKYoon/SlimPajama-6B", "amphora/QwQ-LongCoT-130K"]


def test_results_without_a_measured_value_are_rejected(draft):
    with pytest.raises(ModelCardError, match="no measured value"):
        glide_model_card(draft, results={"dataset": "mt-bench", "draft_strategy": "chain"})


def test_results_with_a_non_numeric_metric_are_rejected(draft):
    with pytest.raises(ModelCardError, match="`tau` must be a number"):
        glide_model_card(draft, results=[{"tau": "fast"}])


def test_unreadable_results_files_are_rejected_with_their_path(draft, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"tau": 2.0,')
    with pytest.raises(ModelCardError, match="broken.json` is not valid JSON"):
        glide_model_card(draft, results=broken)
    with pytest.raises(ModelCardError, match="missing.json` cannot be read"):
        glide_model_card(draft, results=tmp_path / "missing.json")


def test_training_of_the_wrong_type_is_rejected(draft):
    with pytest.raises(ModelCardError, match="`training` must be a JSON object"):
        glide_model_card(draft, training=["DKYoon/SlimPajama-6B"])
    with pytest.raises(ModelCardError, match=r"`training\['datasets'\]` must be a string or a list of strings"):
        glide_model_card(draft, training={"datasets": [1, 2]})


def remote_style_draft(**config_fields):
    """A stand-in draft with only the config fields the card reads (as the remote-code test builds it)."""
    fields = dict(
        target_name_or_path=TARGET_NAME, sliding_window=512, target_kv_layer=-1, num_draft_tokens=5, max_draft_lag=5,
        intermediate_size=18944, final_norm=False, attention_bias=True,
    )  # fmt: skip
    return SimpleNamespace(config=SimpleNamespace(**{**fields, **config_fields}))


def test_model_without_a_config_is_rejected():
    with pytest.raises(ModelCardError, match=r"`model` must be a GLIDE draft .* found a dict without `config`"):
        glide_model_card({"target_name_or_path": TARGET_NAME})


def test_target_name_that_is_not_a_string_is_rejected():
    # Regression: an integer went to `os.path.isdir`, which reads it as a file descriptor.
    with pytest.raises(ModelCardError, match=r"`model\.config\.target_name_or_path` .* found 3\."):
        glide_model_card(remote_style_draft(target_name_or_path=3))


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("tags", "extra-tag", r"`tags` must be a list of strings, found 'extra-tag'"),  # was split into letters
        ("tags", ["ok", 7], r"`tags` must be a list of strings"),
        ("license", 2, r"`license` must be a string or None, found 2"),
        ("repo_id", ["me/glide"], r"`repo_id` must be a string or None"),
    ],
)
def test_arguments_of_the_wrong_type_are_rejected(draft, argument, value, message):
    with pytest.raises(ModelCardError, match=message):
        glide_model_card(draft, **{argument: value})


def test_write_model_card_rejects_a_save_directory_that_is_not_a_path(draft):
    with pytest.raises(ModelCardError, match=r"`save_directory` must be a path, found None"):
        write_model_card(draft, None)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"dataset": {"name": "mt-bench"}, "tau": 3.0}, r"`dataset` must be a string \(a name\)"),
        ({"method": 1, "tau": 3.0}, r"`method` must be a string"),
        ({"temperature": "hot", "tau": 3.0}, r"`temperature` must be a number, found 'hot'"),
        ({"tree_widths": "4,16", "tau": 3.0}, r"`tree_widths` must be a list of integers"),
        ({"tau": float("nan")}, r"`tau` must be a finite number, found nan"),
        ({"tokens_per_second": 10.0, "baseline_tokens_per_second": "x"}, r"`baseline_tokens_per_second` must be a"),
    ],
)
def test_results_row_of_the_wrong_type_names_the_field(draft, row, message):
    with pytest.raises(ModelCardError, match=rf"`results` row 0: {message}"):
        glide_model_card(draft, results=[row])


@pytest.mark.parametrize(
    ("bench", "message"),
    [
        ({"summaries": [{"tau": 2.0}, "vanilla"]}, r"`results\['summaries'\]` item 1 is a str"),
        ({"summaries": [{"tau": 2.0}], "arguments": ["prompts.jsonl"]}, r"`results\['arguments'\]` must be an"),
        ({"summaries": [{"tau": 2.0}], "settings": 256}, r"`results\['settings'\]` must be an object"),
    ],
)
def test_bench_results_of_the_wrong_shape_are_rejected(draft, bench, message):
    with pytest.raises(ModelCardError, match=message):
        glide_model_card(draft, results=bench)


def test_dry_run_training_of_the_wrong_shape_is_rejected(draft):
    with pytest.raises(ModelCardError, match=r"`training\['glide'\]` must be an object .* found list"):
        glide_model_card(draft, training={"glide": ["target"], "training": {}})


def test_results_file_that_is_not_utf8_is_rejected_with_its_path(draft, tmp_path):
    path = tmp_path / "results.json"
    path.write_bytes(b'{"tau": "\xff"}')
    with pytest.raises(ModelCardError, match=r"results\.json` is not UTF-8 text"):
        glide_model_card(draft, results=path)


def test_write_model_card_keeps_its_signature_and_writes_readme(draft, tmp_path):
    path = write_model_card(draft, tmp_path, ["extra-tag"])
    assert path == str(tmp_path / "README.md")
    card = ModelCard.load(path)
    assert "extra-tag" in card.data.tags
    assert "GLIDE draft for `Qwen/Qwen2.5-7B-Instruct`" in card.content


def test_write_model_card_with_results_and_license(draft, tmp_path):
    path = write_model_card(draft, tmp_path, results=BENCHMARK, license="apache-2.0", repo_id="me/glide-qwen")
    card = ModelCard.load(path)
    assert card.data.license == "apache-2.0"
    assert '"me/glide-qwen", trust_remote_code=True' in card.content
    assert "| mt-bench | chain |" in card.content


def test_template_md_documents_the_generated_sections_and_front_matter_keys(draft):
    template = ModelCard((REPO_ROOT / "model_cards" / "template.md").read_text())
    generated = glide_model_card(
        draft, training={"datasets": ["DKYoon/SlimPajama-6B"]}, results=BENCHMARK, license="apache-2.0"
    )

    def headings(card: ModelCard) -> list[str]:
        # The first word of each heading: the template's title has `{target}` where the card has the name.
        return [line.split(" `")[0] for line in card.content.splitlines() if line.startswith("#")]

    assert headings(template) == headings(generated)
    assert set(template.data.to_dict()) == set(front_matter(generated))


def test_generator_runs_copied_next_to_errors_without_glide_hf(tmp_path):
    """As for `trust_remote_code`: model_card.py and errors.py alone in a folder, no glide_hf, no torch."""
    package = tmp_path / "remote_draft"
    package.mkdir()
    (package / "__init__.py").write_text("")
    source = Path(glide_hf.model_card.__file__).parent
    for name in ("model_card.py", "errors.py"):
        shutil.copy(source / name, package / name)
    script = textwrap.dedent(
        """
        import json, sys
        from types import SimpleNamespace
        from remote_draft.model_card import glide_model_card
        config = SimpleNamespace(target_name_or_path="Qwen/Qwen2.5-7B-Instruct", sliding_window=512,
                                 target_kv_layer=-1, num_draft_tokens=5, max_draft_lag=5, intermediate_size=18944,
                                 final_norm=False, attention_bias=True)
        card = glide_model_card(SimpleNamespace(config=config), results={"tau": 3.0})
        print(json.dumps({"imported": sorted(name for name in ("glide_hf", "torch") if name in sys.modules),
                          "has_tau": "| 3.00 |" in card.content}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"imported": [], "has_tau": True}


def test_bench_output_json_gives_one_row_per_method_and_temperature(draft):
    # The shape `glide-hf bench --output-json` writes (other keys left out).
    bench = {
        "arguments": {"prompts": "prompts/mt_bench.jsonl"},
        "device": "cuda:0",
        "settings": {"max_new_tokens": 256},
        "summaries": [
            {"method": "vanilla", "temperature": 0.0, "tau": 1.0, "tokens_per_second": 40.0, "speedup": 1.0},
            {"method": "engine_tree", "temperature": 0.0, "tau": 4.2, "tokens_per_second": 120.0, "speedup": 3.0},
            {"method": "engine_cape", "temperature": 0.7, "tau": None, "error": "out of memory"},
        ],
    }
    results = section(glide_model_card(draft, results=bench), "Results")
    header, *rows = table_rows(results)
    assert header == ["data", "method", "temperature", "new tokens", "tau", "speedup", "tokens/s"]
    assert rows == [
        ["prompts/mt_bench.jsonl", "vanilla", "0", "256", "1.00", "1.00x", "40.0"],
        ["prompts/mt_bench.jsonl", "engine_tree", "0", "256", "4.20", "3.00x", "120.0"],
    ]  # the failed method has no measured value and is left out
    assert "device: cuda:0" in results


def test_usage_snippet_of_the_card_is_valid_python(draft):
    card = glide_model_card(draft, repo_id="me/glide-qwen")
    snippet = re.search(r"```python\n(.*?)```", card.content, flags=re.DOTALL).group(1)
    tree = ast.parse(snippet)
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert {"me/glide-qwen", TARGET_NAME} <= strings
