"""Shared pieces of the tests that run `glide-hf train` on the tiny Llama target (test_atomic_checkpoints.py,
test_distributed.py, test_train_cli.py): the training data, and readers of what a run leaves in its output folder.
The target folder itself is conftest.py's `target_dir` fixture."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

DATA_FILE = Path(__file__).parent / "data" / "tiny_text.jsonl"  # 40 lines of 52 to 108 characters


def losses_by_step(output_dir: Path) -> dict[int, float]:
    """The training losses of a run, by step, from its `trainer_state.json`."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def draft_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the `model.safetensors` file in `path`, by name."""
    with safe_open(path / "model.safetensors", framework="pt") as weights:
        return {key: weights.get_tensor(key) for key in weights.keys()}
