"""Resuming `glide-hf train` from a checkpoint whose files are truncated or of another kind: a `CheckpointFormatError`
that names the file and says how to go on (an earlier checkpoint, or `--init-draft` when the weights are whole), raised
before the target and the data are loaded, instead of a traceback from inside json, safetensors or torch.

A run of the tiny Llama target (conftest.py's `target_dir`) saves checkpoints at steps 2 and 4; each test damages a
copy of `checkpoint-4` and resumes the copied run.
"""

import json
import shutil
from pathlib import Path

import pytest
from tiny_training import cli_flags

import glide_hf.trainer as trainer_module
from glide_hf import CheckpointFormatError, GlideConfigError
from glide_hf.cli import main
from glide_hf.trainer import build_glide_trainer, parse_train_args, resolve_checkpoint, train_glide

SAVE_STEPS = 2
MAX_STEPS = 4  # checkpoints 2 and 4
DAMAGED = f"checkpoint-{MAX_STEPS}"
EARLIER = f"checkpoint-{SAVE_STEPS}"


def run_flags(target_dir: str, output_dir: Path, *extra: str) -> list[str]:
    """The quick run's flags, with a checkpoint every `SAVE_STEPS` steps."""
    return cli_flags(target_dir, output_dir, "--save-steps", str(SAVE_STEPS), *extra)


def train(target_dir: str, output_dir: Path, *extra: str) -> None:
    glide_args, training_args, _ = parse_train_args(run_flags(target_dir, output_dir, *extra))
    train_glide(glide_args, training_args)


@pytest.fixture(scope="module")
def finished_run(target_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    train(target_dir, output_dir, "--max-steps", str(MAX_STEPS))
    return output_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    output_dir = tmp_path / "run"
    shutil.copytree(finished_run, output_dir)
    return output_dir


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage(checkpoint: Path, name: str, how: str) -> None:
    path = checkpoint / name
    if how == "truncated":
        truncate(path)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "foreign":  # a file of another kind under the expected name
        path.write_text(json.dumps({"note": "not a checkpoint file"}))
    else:
        raise ValueError(how)


def fail_if_called(*args, **kwargs):
    raise AssertionError("the target was loaded before the checkpoint was checked")


def resolve(target_dir: str, output_dir: Path, *extra: str) -> str | None:
    glide_args, training_args, _ = parse_train_args(run_flags(target_dir, output_dir, *extra))
    return resolve_checkpoint(glide_args, training_args)


def test_a_whole_checkpoint_passes_the_file_checks(run_copy, target_dir):
    # Control for the tests below, which damage one file of this checkpoint each.
    assert resolve(target_dir, run_copy, "--resume") == str(run_copy / DAMAGED)


@pytest.mark.parametrize(
    "name, how, weights_whole",
    [
        ("model.safetensors", "truncated", False),
        ("model.safetensors", "foreign", False),
        ("config.json", "truncated", False),
        ("optimizer.pt", "truncated", True),
        ("optimizer.pt", "foreign", True),
        ("scheduler.pt", "empty", True),
        ("rng_state.pth", "truncated", True),
        ("trainer_state.json", "truncated", True),
        ("trainer_state.json", "foreign", True),  # valid JSON, but not a Trainer state
    ],
)
def test_resume_from_a_damaged_checkpoint_names_the_file_and_the_way_on(
    run_copy, target_dir, monkeypatch, name, how, weights_whole
):
    damage(run_copy / DAMAGED, name, how)
    # Raised before the target is loaded: the check costs a read of headers, not a model load.
    monkeypatch.setattr(trainer_module, "load_target", fail_if_called)
    with pytest.raises(CheckpointFormatError, match=f"its file `{name}`") as raised:
        train(target_dir, run_copy, "--max-steps", str(MAX_STEPS + 2), "--resume")
    message = str(raised.value)
    assert str(run_copy / DAMAGED) in message
    assert f"--resume-from-checkpoint {run_copy / EARLIER}" in message
    # `--init-draft` loads the config and weights: offered only when those are whole.
    assert (f"--init-draft {run_copy / DAMAGED}" in message) == weights_whole


def test_the_error_names_every_damaged_file(run_copy, target_dir):
    damage(run_copy / DAMAGED, "optimizer.pt", "truncated")
    damage(run_copy / DAMAGED, "scheduler.pt", "truncated")
    with pytest.raises(CheckpointFormatError, match="its files `optimizer.pt` .*, `scheduler.pt` .* are truncated"):
        resolve(target_dir, run_copy, "--resume-from-checkpoint", str(run_copy / DAMAGED))


def test_cli_reports_a_truncated_optimizer_state_in_one_line(run_copy, target_dir, capsys):
    damage(run_copy / DAMAGED, "optimizer.pt", "truncated")
    flags = run_flags(target_dir, run_copy, "--max-steps", str(MAX_STEPS + 2), "--resume")
    assert main(["train", *flags]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert "`optimizer.pt`" in error and "truncated" in error


def test_the_init_draft_advice_trains_on_from_the_weights(run_copy, target_dir, tmp_path):
    damage(run_copy / DAMAGED, "optimizer.pt", "truncated")
    new_stage = tmp_path / "next_stage"
    train(target_dir, new_stage, "--max-steps", "1", "--init-draft", str(run_copy / DAMAGED))
    assert (new_stage / "model.safetensors").is_file()


def test_without_the_check_trainer_fails_deep_inside_torch(run_copy, target_dir, monkeypatch):
    # Control: what the check prevents. Should Trainer start reporting damaged files itself, this fails.
    damage(run_copy / DAMAGED, "optimizer.pt", "truncated")
    monkeypatch.setattr(trainer_module, "_check_checkpoint_files", lambda checkpoint: None)
    with pytest.raises(RuntimeError, match="PytorchStreamReader"):
        train(target_dir, run_copy, "--max-steps", str(MAX_STEPS + 2), "--resume")


def test_trainer_train_called_directly_checks_the_checkpoint_files_too(run_copy, target_dir):
    damage(run_copy / DAMAGED, "optimizer.pt", "truncated")
    glide_args, training_args, _ = parse_train_args(run_flags(target_dir, run_copy, "--max-steps", str(MAX_STEPS + 2)))
    trainer = build_glide_trainer(glide_args, training_args)
    with pytest.raises(CheckpointFormatError, match="optimizer.pt"):
        trainer.train(resume_from_checkpoint=str(run_copy / DAMAGED))


def test_a_checkpoint_missing_its_scheduler_and_optimizer_lists_both_files_clearly(run_copy, target_dir):
    # New-user audit: "lacks scheduler.pt, the optimizer state (optimizer.pt)" read as one file with two names.
    (run_copy / DAMAGED / "scheduler.pt").unlink()
    (run_copy / DAMAGED / "optimizer.pt").unlink()
    with pytest.raises(GlideConfigError) as raised:
        resolve(target_dir, run_copy, "--resume")
    assert (
        f"The checkpoint {run_copy / DAMAGED} lacks scheduler.pt (the learning-rate schedule) and optimizer.pt (the "
        "optimizer state): resuming would restart"
    ) in str(raised.value)


def test_resume_errors_name_the_fields_beside_the_flags(run_copy, target_dir):
    # New-user audit: from Python, the way on was given as command-line flags only.
    damage(run_copy / DAMAGED, "optimizer.pt", "truncated")
    with pytest.raises(CheckpointFormatError) as raised:
        resolve(target_dir, run_copy, "--resume")
    message = str(raised.value)
    assert (
        f"`--resume-from-checkpoint {run_copy / EARLIER}` (`resume_from_checkpoint='{run_copy / EARLIER}'`)" in message
    )
    assert f"`--init-draft {run_copy / DAMAGED}` (`init_draft='{run_copy / DAMAGED}'`)" in message
