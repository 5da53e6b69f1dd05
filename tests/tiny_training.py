"""Shared pieces of the tests that run `glide-hf train` on the tiny Llama target (test_atomic_checkpoints.py,
test_distributed.py, test_train_cli.py, test_trainer_resume_errors.py): the training data, the flags of a quick CPU
run, and readers of what a run leaves in its output folder. The target folder itself is conftest.py's `target_dir`
fixture."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

DATA_FILE = Path(__file__).parent / "data" / "tiny_text.jsonl"  # 40 lines of 52 to 108 characters
MAX_LENGTH = 48  # tokens per sample of a quick run


def cli_flags(target_dir: str, output_dir: Path, *extra: str) -> list[str]:
    """`glide-hf train` flags of a quick CPU run on the tiny target and `DATA_FILE`, then `extra` (later flags win)."""
    return [
        "--target", target_dir,
        "--data", str(DATA_FILE),
        "--output-dir", str(output_dir),
        "--data-cache-dir", str(output_dir.parent / "data_cache"),
        "--max-length", str(MAX_LENGTH),
        "--per-device-train-batch-size", "4",
        "--report-to", "none",
        "--disable-tqdm", "true",
        "--use-cpu",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def losses_by_step(output_dir: Path) -> dict[int, float]:
    """The training losses of a run, by step, from its `trainer_state.json`."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def draft_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the `model.safetensors` file in `path`, by name."""
    with safe_open(path / "model.safetensors", framework="pt") as weights:
        return {key: weights.get_tensor(key) for key in weights.keys()}
