"""Draft-only checkpoints: what `save_pretrained` writes, every way of loading it back, `trust_remote_code` in a
fresh interpreter without glide_hf, `push_to_hub` (captured offline), and the errors for bad checkpoints and targets.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers.utils.hub as transformers_hub
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from transformers import AutoModel, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from glide_hf import (
    CheckpointFormatError,
    GlideConfigError,
    GlideForCausalLM,
    GlideModel,
    TargetMismatchError,
    TargetNotFoundError,
    UnsupportedTargetError,
)
from glide_hf.model_card import write_model_card
from glide_hf.modeling_glide import _target_reference

# Longer than the draft's sliding window (8), so the reload tests cover the windowed self-attention too.
INPUT_IDS = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
MODELING_FILES = ("configuration_glide.py", "modeling_glide.py", "errors.py", "loss.py", "model_card.py")
TOP_LEVEL_SHAPE_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
)


@dataclass
class SavedDraft:
    draft: GlideForCausalLM  # in eval mode; tests must not modify it
    path: Path
    target_path: str


@pytest.fixture(scope="module")
def saved_draft(tiny_target_path, make_draft, tmp_path_factory) -> SavedDraft:
    draft = make_draft(tiny_target_path).eval()
    path = tmp_path_factory.mktemp("glide_draft")
    draft.save_pretrained(path)
    return SavedDraft(draft=draft, path=path, target_path=tiny_target_path)


@pytest.fixture(scope="module")
def llama_saved_draft(tiny_llama_path, make_draft, tmp_path_factory) -> SavedDraft:
    draft = make_draft(tiny_llama_path).eval()
    path = tmp_path_factory.mktemp("glide_llama_draft")
    draft.save_pretrained(path)
    return SavedDraft(draft=draft, path=path, target_path=tiny_llama_path)


def read_config_json(saved: SavedDraft) -> dict:
    return json.loads((saved.path / "config.json").read_text())


def front_matter(card_text: str) -> dict:
    """The YAML front matter of a model card, parsed as `huggingface_hub` parses it."""
    return ModelCard(card_text).data.to_dict()


def logits_of(model, input_ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# --- what save_pretrained writes ---------------------------------------------------------------------------------


def test_save_pretrained_writes_config_weights_generation_config_and_modeling_files(saved_draft):
    files = set(os.listdir(saved_draft.path))
    assert {"config.json", "generation_config.json", "model.safetensors", *MODELING_FILES} <= files


def test_checkpoint_format_doc_lists_exactly_the_modeling_files_saved(saved_draft):
    """docs/checkpoint-format.md names the Python files a saved draft carries for `trust_remote_code`: the same set."""
    saved = {name for name in os.listdir(saved_draft.path) if name.endswith(".py")}
    doc = (Path(__file__).resolve().parents[1] / "docs" / "checkpoint-format.md").read_text()
    row = next(line for line in doc.splitlines() if "`modeling_glide.py`" in line and line.startswith("|"))
    documented = set(re.findall(r"`([a-z_]+\.py)`", row.split("|")[1]))
    assert documented == saved


def test_config_json_names_target_and_nests_its_config(saved_draft):
    config = read_config_json(saved_draft)
    target_config = json.loads((Path(saved_draft.target_path) / "config.json").read_text())
    assert config["model_type"] == "glide"
    assert config["target_name_or_path"] == saved_draft.target_path
    assert config["target_config"]["model_type"] == target_config["model_type"]
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert config["target_config"][key] == target_config[key], key


def test_config_json_repeats_draft_shape_as_top_level_keys(saved_draft):
    config = read_config_json(saved_draft)
    target_config = saved_draft.draft.target.config
    # Qwen2's config has no `head_dim` key: it is derived, as in the Qwen2 attention.
    expected = {key: getattr(target_config, key, None) for key in TOP_LEVEL_SHAPE_KEYS}
    expected["head_dim"] = target_config.hidden_size // target_config.num_attention_heads
    for key in TOP_LEVEL_SHAPE_KEYS:
        assert config.get(key) == expected[key], key


def test_config_json_auto_map_points_auto_classes_at_saved_files(saved_draft):
    assert read_config_json(saved_draft)["auto_map"] == {
        "AutoConfig": "configuration_glide.GlideConfig",
        "AutoModel": "modeling_glide.GlideModel",
        "AutoModelForCausalLM": "modeling_glide.GlideForCausalLM",
    }


def test_generation_config_json_sets_assisted_decoding_defaults(saved_draft):
    generation_config = json.loads((saved_draft.path / "generation_config.json").read_text())
    assert generation_config["num_assistant_tokens"] == saved_draft.draft.config.num_draft_tokens
    assert generation_config["num_assistant_tokens_schedule"] == "constant"
    assert generation_config["assistant_confidence_threshold"] == 0.0


def test_safetensors_hold_every_draft_tensor_and_no_target_tensor(saved_draft):
    with safe_open(saved_draft.path / "model.safetensors", framework="pt") as weights:
        keys = set(weights.keys())
    draft_keys = {name for name in saved_draft.draft.state_dict() if ".target." not in f".{name}"}
    assert not [key for key in keys if "target." in key]
    assert keys == draft_keys


def test_save_pretrained_writes_a_model_card_naming_the_target(saved_draft):
    card = (saved_draft.path / "README.md").read_text()
    metadata = front_matter(card)
    assert metadata["library_name"] == "transformers" and "speculative-decoding" in metadata["tags"]
    # A target loaded from a local folder is no Hub repo id: the card names it in its text, not as `base_model`.
    assert "base_model" not in metadata
    assert saved_draft.target_path in card


def test_model_card_names_a_hub_target_as_base_model(llama_saved_draft, tmp_path):
    draft = llama_saved_draft.draft
    original = draft.config.target_name_or_path
    draft.config.target_name_or_path = "meta-llama/Llama-3.1-8B-Instruct"
    try:
        card_path = write_model_card(draft, tmp_path)
    finally:
        draft.config.target_name_or_path = original
    metadata = front_matter(Path(card_path).read_text())
    assert metadata["base_model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert metadata["library_name"] == "transformers"


# --- loading it back --------------------------------------------------------------------------------------------


def test_from_pretrained_loads_target_from_config_path_with_identical_logits(saved_draft):
    loaded = GlideForCausalLM.from_pretrained(saved_draft.path).eval()
    assert loaded.target is not saved_draft.draft.target
    assert loaded.target.config._name_or_path == saved_draft.target_path
    assert torch.equal(logits_of(loaded), logits_of(saved_draft.draft))


def test_from_pretrained_with_target_model_shares_it_and_gives_identical_logits(saved_draft, make_target):
    family = saved_draft.draft.config.target_config.model_type
    target = make_target(family)
    loaded = GlideForCausalLM.from_pretrained(saved_draft.path, target_model=target).eval()
    assert loaded.target is target
    assert torch.equal(logits_of(loaded), logits_of(saved_draft.draft))


def test_from_pretrained_takes_the_target_as_a_path_too(saved_draft):
    loaded = GlideForCausalLM.from_pretrained(saved_draft.path, target_model=Path(saved_draft.target_path)).eval()
    assert loaded.target is not None and loaded.target.config.model_type == saved_draft.draft.target.config.model_type
    assert torch.equal(logits_of(loaded), logits_of(saved_draft.draft))


def test_a_checkpoint_missing_draft_tensors_is_refused_not_filled_with_random_values(saved_draft, tmp_path):
    from safetensors.torch import load_file, save_file

    incomplete = tmp_path / "incomplete"
    shutil.copytree(saved_draft.path, incomplete)
    tensors = load_file(incomplete / "model.safetensors")
    save_file(
        {name: value for name, value in tensors.items() if ".mlp." not in name}, incomplete / "model.safetensors"
    )
    with pytest.raises(CheckpointFormatError, match=r"lacks 3 of the draft's tensors \(e.g. \['model.layer.mlp"):
        GlideForCausalLM.from_pretrained(incomplete)
    model, info = GlideForCausalLM.from_pretrained(saved_draft.path, output_loading_info=True)
    assert isinstance(model, GlideForCausalLM) and not [key for key in info["missing_keys"] if "target" not in key]


def test_auto_model_for_causal_lm_loads_draft_with_identical_logits(saved_draft):
    loaded = AutoModelForCausalLM.from_pretrained(saved_draft.path).eval()
    assert type(loaded) is GlideForCausalLM
    assert torch.equal(logits_of(loaded), logits_of(saved_draft.draft))


def test_auto_model_loads_glide_model_with_identical_hidden_states(saved_draft):
    loaded = AutoModel.from_pretrained(saved_draft.path).eval()
    assert type(loaded) is GlideModel
    with torch.no_grad():
        hidden = loaded(input_ids=INPUT_IDS).last_hidden_state
        expected = saved_draft.draft.model(input_ids=INPUT_IDS).last_hidden_state
    assert torch.equal(hidden, expected)


# --- trust_remote_code in a fresh interpreter without glide_hf ------------------------------------------------------

# Run with `python -I` (no PYTHONPATH, user site or working directory on sys.path). The editable install still puts
# `src/` on sys.path through a .pth file in site-packages, so the script drops every sys.path entry that holds a
# `glide_hf` package and any setuptools editable finder, checks that `find_spec` no longer sees glide_hf, and then
# installs a finder that refuses glide_hf, so that remote code importing it fails loudly instead of finding a copy.
_REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import importlib.util
    import os
    import sys

    sys.path[:] = [entry for entry in sys.path if not os.path.isdir(os.path.join(entry or os.curdir, "glide_hf"))]
    sys.meta_path[:] = [finder for finder in sys.meta_path if not type(finder).__module__.startswith("__editable__")]
    spec_found = importlib.util.find_spec("glide_hf") is not None


    class RefuseGlideHf(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "glide_hf" or name.startswith("glide_hf."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, RefuseGlideHf())
    try:
        import glide_hf  # noqa: F401
        import_error = None
    except ImportError as error:
        import_error = repr(error)

    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    draft_path, reference_path, results_path = sys.argv[1:4]
    reference = torch.load(reference_path)
    draft = AutoModelForCausalLM.from_pretrained(draft_path, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = draft(input_ids=reference["input_ids"]).logits
    base = AutoModel.from_pretrained(draft_path, trust_remote_code=True).eval()
    with torch.no_grad():
        hidden_states = base(input_ids=reference["input_ids"]).last_hidden_state
    target = draft.target
    prompt = reference["input_ids"][:1]
    assisted = target.generate(prompt, assistant_model=draft, max_new_tokens=24, do_sample=False)
    greedy = target.generate(prompt, max_new_tokens=24, do_sample=False)
    engine = draft.generate(prompt, max_new_tokens=24, do_sample=False, draft_strategy="tree", tree_widths=(2, 3))
    split = draft.generate(prompt, max_new_tokens=24, do_sample=False, verify_attention="split")
    torch.save(
        {
            "spec_found": spec_found,
            "import_error": import_error,
            "glide_hf_in_sys_modules": any(name.split(".")[0] == "glide_hf" for name in sys.modules),
            "draft_module": type(draft).__module__,
            "base_module": type(base).__module__,
            "hidden_states": hidden_states,
            "logits": logits,
            "assisted": assisted,
            "greedy": greedy,
            "engine": engine,
            "split": split,
            "engine_module": type(draft).generate.__module__,
        },
        results_path,
    )
    """
)


@pytest.fixture(scope="module")
def remote_code_results(saved_draft, tmp_path_factory) -> dict:
    """Run `_REMOTE_CODE_SCRIPT` once per saved draft and return what it recorded."""
    work_dir = tmp_path_factory.mktemp("remote_code")
    reference_path, results_path = work_dir / "reference.pt", work_dir / "results.pt"
    torch.save({"input_ids": INPUT_IDS}, reference_path)
    env = {name: value for name, value in os.environ.items() if not name.startswith(("HF_", "PYTHON"))}
    env.update(HF_HOME=str(work_dir / "hf_home"), HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            _REMOTE_CODE_SCRIPT,
            str(saved_draft.path),
            str(reference_path),
            str(results_path),
        ],
        cwd=work_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return torch.load(results_path)


def test_remote_code_subprocess_cannot_import_glide_hf(remote_code_results):
    assert remote_code_results["spec_found"] is False
    assert remote_code_results["import_error"] is not None
    assert remote_code_results["glide_hf_in_sys_modules"] is False
    assert remote_code_results["draft_module"].startswith("transformers_modules.")
    assert remote_code_results["base_module"].startswith("transformers_modules.")


def test_remote_code_draft_logits_equal_in_process_logits(remote_code_results, saved_draft):
    assert torch.equal(remote_code_results["logits"], logits_of(saved_draft.draft))


def test_remote_code_auto_model_hidden_states_equal_in_process_hidden_states(remote_code_results, saved_draft):
    with torch.no_grad():
        expected = saved_draft.draft.model(input_ids=INPUT_IDS).last_hidden_state
    assert torch.equal(remote_code_results["hidden_states"], expected)


def test_remote_code_draft_as_assistant_keeps_greedy_output(remote_code_results):
    assisted, greedy = remote_code_results["assisted"], remote_code_results["greedy"]
    assert greedy.shape[1] > INPUT_IDS.shape[1]
    assert torch.equal(assisted, greedy)


def test_remote_code_engine_keeps_greedy_output(remote_code_results):
    """The engine and its modules (tree, sampling, caches, split attention) travel with the remote code."""
    greedy = remote_code_results["greedy"]
    assert torch.equal(remote_code_results["engine"], greedy)
    assert torch.equal(remote_code_results["split"], greedy)
    assert remote_code_results["engine_module"].startswith("transformers_modules.")


# --- push_to_hub, captured offline --------------------------------------------------------------------------------


class CapturingHubApi:
    """Stands in for `HfApi`: records each committed file's bytes (the upload folder is deleted after the push)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            self.files[operation.path_in_repo] = Path(operation.path_or_fileobj).read_bytes()
        return "captured-commit"


@pytest.fixture
def pushed_files(llama_saved_draft, monkeypatch) -> dict[str, bytes]:
    api = CapturingHubApi()

    def no_card_on_the_hub(*args, **kwargs):
        raise EntryNotFoundError("README.md not found")

    monkeypatch.setattr(transformers_hub, "hf_api", lambda: api)
    # A new repo has no card: transformers' `create_and_tag_model_card` then builds its default one.
    monkeypatch.setattr(transformers_hub.ModelCard, "load", no_card_on_the_hub)
    assert llama_saved_draft.draft.push_to_hub("glide-hf-tests/tiny-draft") == "captured-commit"
    return api.files


def test_push_to_hub_uploads_draft_weights_config_card_and_modeling_files(pushed_files, llama_saved_draft):
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md", *MODELING_FILES} <= set(
        pushed_files
    )
    weights = load_safetensors(pushed_files["model.safetensors"])
    assert weights
    assert not [key for key in weights if "target." in key]
    assert json.loads(pushed_files["config.json"])["target_name_or_path"] == llama_saved_draft.target_path


def test_push_to_hub_uploads_the_glide_model_card(pushed_files, llama_saved_draft):
    card = pushed_files["README.md"].decode()
    assert "GLIDE draft" in card and llama_saved_draft.target_path in card
    assert "speculative-decoding" in front_matter(card)["tags"]


def test_save_pretrained_with_push_to_hub_uploads_the_saved_folder(llama_saved_draft, monkeypatch, tmp_path):
    api = CapturingHubApi()
    monkeypatch.setattr(transformers_hub, "hf_api", lambda: api)
    result = llama_saved_draft.draft.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="me/tiny-draft")
    assert result == "captured-commit"
    assert {"README.md", "model.safetensors", "config.json"} <= set(api.files)
    assert "GLIDE draft" in api.files["README.md"].decode()


# --- bad checkpoints and bad targets ------------------------------------------------------------------------------


def test_from_pretrained_rejects_plain_target_checkpoint(tiny_llama_path):
    with pytest.raises(GlideConfigError, match="model_type='llama'"):
        GlideForCausalLM.from_pretrained(tiny_llama_path)


def test_from_pretrained_rejects_missing_path(tmp_path):
    with pytest.raises(GlideConfigError, match="No GLIDE draft config found"):
        GlideForCausalLM.from_pretrained(str(tmp_path / "no_such_draft"))


def test_from_pretrained_rejects_folder_without_config(tmp_path):
    with pytest.raises(GlideConfigError, match="No GLIDE draft config found"):
        GlideForCausalLM.from_pretrained(str(tmp_path))


@pytest.fixture
def draft_naming_missing_target(llama_saved_draft, tmp_path) -> tuple[Path, str]:
    missing_target = str(tmp_path / "no_such_target")
    path = tmp_path / "draft"
    shutil.copytree(llama_saved_draft.path, path)
    config = json.loads((path / "config.json").read_text())
    config["target_name_or_path"] = missing_target
    (path / "config.json").write_text(json.dumps(config))
    return path, missing_target


def test_from_pretrained_raises_target_not_found_for_missing_target(draft_naming_missing_target):
    path, missing_target = draft_naming_missing_target
    with pytest.raises(TargetNotFoundError, match=re.escape(f"`{missing_target}` could not be loaded")):
        GlideForCausalLM.from_pretrained(path)


@pytest.mark.parametrize(
    ("field", "other_value"),
    # A draft reads one layer by index: models of one width that differ in depth only are other targets.
    [("num_key_value_heads", 4), ("hidden_size", 128), ("vocab_size", 600), ("num_hidden_layers", 5)],
)
def test_from_pretrained_rejects_target_with_other_shape(llama_saved_draft, make_target, field, other_value):
    other_target = make_target("llama", **{field: other_value})
    config = llama_saved_draft.draft.config
    expected = getattr(config.target_config if field == "num_hidden_layers" else config, field)
    message = re.escape(
        f"`{field}` is {other_value} but the GLIDE draft was built for a target with `{field}={expected}`"
    )
    with pytest.raises(TargetMismatchError, match=message):
        GlideForCausalLM.from_pretrained(llama_saved_draft.path, target_model=other_target)


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def test_from_target_rejects_non_rotary_target(tiny_gpt2, make_draft):
    with pytest.raises(UnsupportedTargetError, match="rotary"):
        make_draft(tiny_gpt2)


def test_from_pretrained_rejects_non_rotary_target_model(llama_saved_draft, tiny_gpt2):
    with pytest.raises(UnsupportedTargetError, match="rotary"):
        GlideForCausalLM.from_pretrained(llama_saved_draft.path, target_model=tiny_gpt2)


def test_a_target_loaded_from_a_relative_folder_is_named_by_its_absolute_path(tiny_llama_path, tmp_path, monkeypatch):
    """The saved draft loads its target from any working folder; Hub ids stay as they are."""
    import os

    monkeypatch.chdir(os.path.dirname(tiny_llama_path))
    relative = os.path.basename(tiny_llama_path)
    draft = GlideForCausalLM.from_target(relative, sliding_window=8)
    assert draft.config.target_name_or_path == os.path.abspath(relative)
    draft.save_pretrained(tmp_path / "draft")
    monkeypatch.chdir(tmp_path)
    assert GlideForCausalLM.from_pretrained(tmp_path / "draft").target is not None
    assert _target_reference("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


def test_a_tokenizer_passed_as_target_model_is_refused(llama_saved_draft):
    from tiny_tokenizer import build_byte_tokenizer

    with pytest.raises(UnsupportedTargetError, match="must be a Transformers `PreTrainedModel`"):
        GlideForCausalLM.from_pretrained(llama_saved_draft.path, target_model=build_byte_tokenizer())
