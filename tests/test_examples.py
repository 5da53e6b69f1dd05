"""Every script in examples/ runs end to end with `--tiny` (issue 6, item 2): a random tiny target built from a config,
on the CPU, offline. This is how CI runs the examples (`make test`).

Each example runs in a fresh interpreter from the repository root, as a user runs it, with the Hub switched off and
an empty Hugging Face cache: a `--tiny` run that tried to download anything would fail here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = (
    "assisted_generation.py",
    "fast_generate.py",
    "train_glide.py",
    "train_lora_draft.py",
    "push_to_hub.py",
    "convert_longspec.py",
)
# Generous: each takes a few seconds on one core, most of it importing torch and transformers.
TIMEOUT_SECONDS = 120


def run_example(name: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [sys.executable, str(Path("examples") / name), "--tiny", *flags],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
    )  # fmt: skip


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_with_tiny(name, tmp_path):
    result = run_example(name, tmp_path)
    assert result.returncode == 0, f"{name} --tiny failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def test_every_example_script_is_tested():
    scripts = {path.name for path in (REPO_ROOT / "examples").glob("*.py") if not path.name.startswith("_")}
    assert scripts == set(EXAMPLES)


@pytest.mark.parametrize("name", ["assisted_generation", "fast_generate"])
def test_without_target_the_examples_load_the_target_the_draft_names(name, tiny_llama_path, tmp_path, monkeypatch):
    """`--target` left out: the target the draft's config.json names (not a default model of another family)."""
    import importlib

    from transformers import AutoModelForCausalLM

    from glide_hf import GlideForCausalLM

    monkeypatch.syspath_prepend(str(REPO_ROOT / "examples"))
    module = importlib.import_module(name)
    target = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    GlideForCausalLM.from_target(target, sliding_window=8).save_pretrained(tmp_path / "draft")
    loaded = []
    real_load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        module.AutoModelForCausalLM, "from_pretrained", lambda path, **kw: loaded.append(path) or real_load(path, **kw)
    )
    monkeypatch.setattr(module.AutoTokenizer, "from_pretrained", lambda path, **kw: None)
    args = module.parse_args(["--draft", str(tmp_path / "draft")])
    _, draft, *_ = module.load(args)
    assert loaded == [tiny_llama_path] and args.target == tiny_llama_path
    assert draft.target is not None
