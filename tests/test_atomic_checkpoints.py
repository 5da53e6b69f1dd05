"""Atomic checkpoints (`GlideTrainer`): a checkpoint save killed halfway leaves no `checkpoint-N` folder for
`--resume` to pick, and the run resumed after the crash, which restarts in its second epoch, reproduces an
uninterrupted run (optimizer, scheduler, RNG states and data position restored, Anchor-Offset draws of the right
epoch).

The crash is simulated by raising from Trainer's RNG-state save, which runs after the weights and the optimizer are
written: stock Trainer then leaves a folder that looks like a checkpoint but cannot resume the run exactly.

A checkpoint saved again at the same step (a run resumed from an earlier checkpoint) replaces the old one with no
moment where neither is on disk: a crash at each point of the replacement (simulated by raising from the rename or
removal there) leaves the old or the new one, which the next `--resume` picks.
"""

import shutil
from pathlib import Path

import pytest
import torch
from tiny_training import DATA_FILE, draft_weights, losses_by_step
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

import glide_hf.trainer as trainer_module
from glide_hf.trainer import parse_train_args, train_glide

MAX_LENGTH = 48
BATCH_SIZE = 8  # 5 steps per epoch
MAX_STEPS = 10  # two epochs
SAVE_STEPS = 3  # checkpoints at steps 3, 6 and 9
CRASH_STEP = 9  # the save at step 9 dies, so the run resumes from step 6: one batch into the second epoch
LAST_GOOD_STEP = 6


class SimulatedCrash(Exception):
    pass


def train(target_dir: str, output_dir: Path, *extra: str, max_steps: int = MAX_STEPS) -> None:
    flags = [
        "--target", target_dir,
        "--data", str(DATA_FILE),
        "--output-dir", str(output_dir),
        "--data-cache-dir", str(output_dir.parent / "data_cache"),
        "--max-length", str(MAX_LENGTH),
        "--anchor-offset",
        "--per-device-train-batch-size", str(BATCH_SIZE),
        "--max-steps", str(max_steps),
        "--save-steps", str(SAVE_STEPS),
        "--logging-steps", "1",
        "--report-to", "none",
        "--disable-tqdm", "true",
        "--use-cpu",
        "--seed", "0",
        *extra,
    ]  # fmt: skip
    glide_args, training_args, _ = parse_train_args(flags)
    train_glide(glide_args, training_args)


def crash_when_saving_rng_state_at(step: int):
    """A replacement for `Trainer._save_rng_state` that raises at `step`, after the weights and optimizer of that
    step's checkpoint are written."""
    save_rng_state = Trainer._save_rng_state

    def crashing_save_rng_state(self, output_dir: str) -> None:
        if self.state.global_step == step:
            raise SimulatedCrash(f"killed while saving the checkpoint of step {step}")
        save_rng_state(self, output_dir)

    return crashing_save_rng_state


@pytest.fixture(scope="module")
def uninterrupted_dir(target_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(target_dir, output_dir)
    return output_dir


@pytest.fixture(scope="module")
def crashed_dir(target_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("crashed") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_save_rng_state", crash_when_saving_rng_state_at(CRASH_STEP))
        with pytest.raises(SimulatedCrash):
            train(target_dir, output_dir)
    return output_dir


@pytest.fixture(scope="module")
def resumed_dir(crashed_dir, target_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(crashed_dir, output_dir)
    train(target_dir, output_dir, "--resume")
    return output_dir


def test_crash_while_saving_leaves_no_checkpoint_folder(crashed_dir):
    assert not (crashed_dir / f"checkpoint-{CRASH_STEP}").exists()
    staged = crashed_dir / f"checkpoint-{CRASH_STEP}.tmp" / f"checkpoint-{CRASH_STEP}"
    assert (staged / "model.safetensors").is_file() and (staged / "optimizer.pt").is_file()
    assert not (staged / "rng_state.pth").exists()
    assert get_last_checkpoint(str(crashed_dir)) == str(crashed_dir / f"checkpoint-{LAST_GOOD_STEP}")


def test_checkpoints_saved_before_the_crash_are_complete(crashed_dir):
    for step in range(SAVE_STEPS, CRASH_STEP, SAVE_STEPS):
        names = {path.name for path in (crashed_dir / f"checkpoint-{step}").iterdir()}
        expected = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
        assert expected <= names, (step, expected - names)


def test_stock_trainer_leaves_a_half_written_checkpoint_that_resume_would_pick(target_dir, tmp_path, monkeypatch):
    # Control for the tests above: what `GlideTrainer` prevents. Should Trainer itself start saving atomically, this
    # fails, and `GlideTrainer` can go.
    monkeypatch.setattr(trainer_module, "GlideTrainer", Trainer)
    monkeypatch.setattr(Trainer, "_save_rng_state", crash_when_saving_rng_state_at(SAVE_STEPS))
    output_dir = tmp_path / "run"
    with pytest.raises(SimulatedCrash):
        train(str(target_dir), output_dir, max_steps=SAVE_STEPS)
    half_written = output_dir / f"checkpoint-{SAVE_STEPS}"
    assert get_last_checkpoint(str(output_dir)) == str(half_written)
    assert (half_written / "optimizer.pt").is_file() and not (half_written / "rng_state.pth").exists()


def test_resume_after_the_crash_reproduces_the_uninterrupted_run(resumed_dir, crashed_dir, uninterrupted_dir):
    # Resumed, not retrained from scratch (which would give the same numbers): the last good checkpoint was not saved
    # again (copytree keeps modification times).
    restarted_from = Path(f"checkpoint-{LAST_GOOD_STEP}") / "model.safetensors"
    assert (resumed_dir / restarted_from).stat().st_mtime_ns == (crashed_dir / restarted_from).stat().st_mtime_ns
    resumed, uninterrupted = losses_by_step(resumed_dir), losses_by_step(uninterrupted_dir)
    # The resumed run logged the steps after the last good checkpoint on top of the history it restored.
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, MAX_STEPS + 1))
    assert resumed == uninterrupted
    # On CPU the same ops on the same inputs give the same floats; the tolerance only absorbs summation-order noise,
    # were a kernel to pick another blocking. Another data order, Anchor-Offset epoch, lag draw, learning rate or
    # optimizer state would move the weights far more.
    resumed_weights, uninterrupted_weights = draft_weights(resumed_dir), draft_weights(uninterrupted_dir)
    assert resumed_weights.keys() == uninterrupted_weights.keys()
    for name, tensor in uninterrupted_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_resume_replaces_the_leftover_of_the_crashed_save(resumed_dir):
    assert not list(resumed_dir.glob("*.tmp"))
    assert (resumed_dir / f"checkpoint-{CRASH_STEP}" / "rng_state.pth").is_file()


# --- a checkpoint saved again at the same step ----------------------------------------------------------------------

# A run resumed from `checkpoint-6` of the uninterrupted run saves steps 9 and 10 again, over the checkpoints there.
REPLACED_STEP = 9  # the save that the crash tests kill
CHECKPOINT_FILES = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


def folder_ids(output_dir: Path) -> dict[str, int]:
    """The inode of each folder in `output_dir`, by name: a rename keeps it, a new save gets another."""
    return {path.name: path.stat().st_ino for path in output_dir.iterdir() if path.is_dir()}


def resume_from_last_good_checkpoint(target_dir: str, output_dir: Path) -> None:
    train(target_dir, output_dir, "--resume-from-checkpoint", str(output_dir / f"checkpoint-{LAST_GOOD_STEP}"))


def test_saving_again_at_the_same_step_replaces_the_checkpoint(uninterrupted_dir, target_dir, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(uninterrupted_dir, output_dir)
    before = folder_ids(output_dir)
    resume_from_last_good_checkpoint(target_dir, output_dir)
    after = folder_ids(output_dir)
    assert after.keys() == before.keys() == {f"checkpoint-{step}" for step in (3, 6, 9, 10)}
    # Saved anew: the checkpoints of the steps the resumed run trained; the earlier ones are untouched.
    assert {name for name in after if after[name] != before[name]} == {"checkpoint-9", "checkpoint-10"}
    assert not list(output_dir.glob("*.replaced")) and not list(output_dir.glob("*.tmp"))
    assert CHECKPOINT_FILES <= {path.name for path in (output_dir / "checkpoint-9").iterdir()}


class CrashPoint:
    """Where the save of `checkpoint-9` over the existing one is killed, as a patch that raises there."""

    @staticmethod
    def before_setting_aside(patch: pytest.MonkeyPatch) -> None:
        replace = trainer_module.os.replace

        def crashing_replace(source, destination):
            if str(destination).endswith(f"checkpoint-{REPLACED_STEP}.replaced"):
                raise SimulatedCrash("killed before setting the old checkpoint aside")
            replace(source, destination)

        patch.setattr(trainer_module.os, "replace", crashing_replace)

    @staticmethod
    def between_the_renames(patch: pytest.MonkeyPatch) -> None:
        replace = trainer_module.os.replace

        def crashing_replace(source, destination):
            if str(source).endswith(f"checkpoint-{REPLACED_STEP}.tmp/checkpoint-{REPLACED_STEP}"):
                raise SimulatedCrash("killed after setting the old checkpoint aside, before the new one moved in")
            replace(source, destination)

        patch.setattr(trainer_module.os, "replace", crashing_replace)

    @staticmethod
    def before_removing_the_old_one(patch: pytest.MonkeyPatch) -> None:
        rmtree = trainer_module.shutil.rmtree

        def crashing_rmtree(path, *args, **kwargs):
            if str(path).endswith(f"checkpoint-{REPLACED_STEP}.replaced"):
                raise SimulatedCrash("killed after the new checkpoint moved in, before the old one was removed")
            rmtree(path, *args, **kwargs)

        patch.setattr(trainer_module.shutil, "rmtree", crashing_rmtree)


@pytest.mark.parametrize(
    "crash_point, leftover, kept",
    [
        # Which `checkpoint-9` the crash leaves under that name or set aside, and which one the next run keeps.
        ("before_setting_aside", "checkpoint-9.tmp", "old"),
        ("between_the_renames", "checkpoint-9.replaced", "old"),
        ("before_removing_the_old_one", "checkpoint-9.replaced", "new"),
    ],
)
def test_a_crash_while_replacing_a_checkpoint_loses_no_checkpoint(
    uninterrupted_dir, target_dir, tmp_path, crash_point, leftover, kept
):
    # A run whose last checkpoint is checkpoint-9, resumed from checkpoint-6.
    output_dir = tmp_path / "run"
    shutil.copytree(uninterrupted_dir, output_dir)
    shutil.rmtree(output_dir / f"checkpoint-{MAX_STEPS}")
    old_id = folder_ids(output_dir)["checkpoint-9"]
    with pytest.MonkeyPatch.context() as patch:
        getattr(CrashPoint, crash_point)(patch)
        with pytest.raises(SimulatedCrash):
            resume_from_last_good_checkpoint(target_dir, output_dir)
    crashed = folder_ids(output_dir)
    assert leftover in crashed
    if crash_point == "between_the_renames":
        # The only copy of checkpoint-9 is the one set aside, which resume does not pick as it stands...
        assert "checkpoint-9" not in crashed and crashed["checkpoint-9.replaced"] == old_id
        assert get_last_checkpoint(str(output_dir)) == str(output_dir / f"checkpoint-{LAST_GOOD_STEP}")
    else:
        assert "checkpoint-9" in crashed
    kept_id = old_id if kept == "old" else crashed["checkpoint-9"]

    # ...but the next run puts it back first, and resumes from it: checkpoint-9 is not saved again (same folder),
    # and the steps after it reproduce the uninterrupted run.
    train(target_dir, output_dir, "--resume")
    recovered = folder_ids(output_dir)
    assert recovered.keys() == {f"checkpoint-{step}" for step in (3, 6, 9, 10)}
    assert recovered["checkpoint-9"] == kept_id
    assert CHECKPOINT_FILES <= {path.name for path in (output_dir / "checkpoint-9").iterdir()}
    assert losses_by_step(output_dir) == losses_by_step(uninterrupted_dir)
