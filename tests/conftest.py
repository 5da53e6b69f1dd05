"""Shared fixtures: seeded tiny random Llama and Qwen2 targets, saved to disk, and a GLIDE draft factory.

Targets follow STYLE.md "Tests" (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab <= 1000) and are built from configs
with a fixed seed, so every run sees the same weights. Each family has its own vocabulary size, so a test that mixes
up the two targets fails on the draft's shape check instead of passing by accident. The Qwen2 target ties its LM head
to its embedding (as Qwen2-0.5B does); the Llama target does not.

Fixtures:
    tiny_llama_path, tiny_qwen2_path: `str` folders written by `save_pretrained` (session scope), usable as a draft's
        `target_name_or_path`.
    tiny_target_path: one of the two, parametrized over `TARGET_FAMILIES`; narrow it with
        `@pytest.mark.parametrize("tiny_target_path", ["qwen2"], indirect=True)`.
    make_target(family, **config_overrides): a fresh target in eval mode, loaded from the saved folder (so its
        `config._name_or_path` is that folder), or, when overrides are given, a new seeded random model that is not
        saved anywhere (e.g. `make_target("llama", num_key_value_heads=4)` for a target of another shape).
    make_draft(target, **overrides): `GlideForCausalLM.from_target(target, sliding_window=8, **overrides)` with a fixed
        seed; `target` is a model or a folder. The draft is returned as `from_target` leaves it (training mode).
    target_dir: `str` folder holding a copy of the tiny Llama target beside the byte-level tokenizer of
        tiny_tokenizer.py, as a real target folder holds both (module scope: each test module trains from its own
        copy); the target of the `glide-hf train` tests. test_distill.py defines its own `target_dir`.
"""

import shutil

import pytest
import torch
from tiny_tokenizer import build_byte_tokenizer
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from glide_hf import GlideForCausalLM

TARGET_FAMILIES = ("llama", "qwen2")
TARGET_SEED = 0
DRAFT_SEED = 1
# A window shorter than the test sequences, so that the sliding window is exercised.
DRAFT_SLIDING_WINDOW = 8

_TARGET_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"vocab_size": 512, "tie_word_embeddings": False}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"vocab_size": 384, "tie_word_embeddings": True}),
}
_TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny_target_config(family: str, **overrides) -> PreTrainedConfig:
    """The config of the tiny `family` target, with `overrides` applied."""
    if family not in _TARGET_CLASSES:
        raise ValueError(f"Unknown target family {family!r}; expected one of {TARGET_FAMILIES}.")
    config_class, _, family_fields = _TARGET_CLASSES[family]
    return config_class(**{**_TINY_SHAPE, **family_fields, **overrides})


def build_tiny_target(family: str, seed: int = TARGET_SEED, **overrides) -> PreTrainedModel:
    """A seeded random tiny `family` target in eval mode."""
    _, model_class, _ = _TARGET_CLASSES[family]
    config = tiny_target_config(family, **overrides)
    torch.manual_seed(seed)
    return model_class(config).eval()


def _save_tiny_target(family: str, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp(f"tiny_{family}")
    build_tiny_target(family).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> str:
    return _save_tiny_target("llama", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory) -> str:
    return _save_tiny_target("qwen2", tmp_path_factory)


@pytest.fixture(scope="session", params=TARGET_FAMILIES)
def tiny_target_path(request) -> str:
    return request.getfixturevalue(f"tiny_{request.param}_path")


@pytest.fixture(scope="session")
def tiny_target_paths(tiny_llama_path, tiny_qwen2_path) -> dict[str, str]:
    return {"llama": tiny_llama_path, "qwen2": tiny_qwen2_path}


@pytest.fixture(scope="session")
def make_target(tiny_target_paths):
    def _make_target(family: str = "llama", **config_overrides) -> PreTrainedModel:
        if config_overrides:
            return build_tiny_target(family, **config_overrides)
        if family not in tiny_target_paths:
            raise ValueError(f"Unknown target family {family!r}; expected one of {TARGET_FAMILIES}.")
        return AutoModelForCausalLM.from_pretrained(tiny_target_paths[family]).eval()

    return _make_target


@pytest.fixture(scope="session")
def make_draft():
    def _make_draft(target: PreTrainedModel | str, **overrides) -> GlideForCausalLM:
        overrides.setdefault("sliding_window", DRAFT_SLIDING_WINDOW)
        torch.manual_seed(DRAFT_SEED)
        return GlideForCausalLM.from_target(target, **overrides)

    return _make_draft


@pytest.fixture(scope="module")
def target_dir(tiny_llama_path, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("target_with_tokenizer") / "target"
    shutil.copytree(tiny_llama_path, path)
    build_byte_tokenizer().save_pretrained(path)
    return str(path)
