"""`glide-hf train` and `train_glide`: end to end on a small JSONL file, config files and `--dry-run`, the example
stage configs, multi-stage `init_draft`, and resuming.

The target is the tiny Llama of conftest.py copied next to a byte-level tokenizer (tiny_tokenizer.py), as a real
target folder holds both.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny_training import DATA_FILE, cli_flags, draft_weights
from transformers import TrainingArguments

from glide_hf import GlideForCausalLM, TargetMismatchError
from glide_hf.cli import main
from glide_hf.trainer import (
    ACCEPTANCE_METRIC,
    GlideTrainingArguments,
    build_glide_trainer,
    parse_train_args,
    train_glide,
)

EXAMPLE_CONFIGS = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml"))
RESUME_STEPS = 6
CHECKPOINT_STEP = 3


def arguments(target_dir: str, output_dir: Path, *extra: str) -> tuple[GlideTrainingArguments, TrainingArguments]:
    glide_args, training_args, _ = parse_train_args(cli_flags(target_dir, output_dir, *extra))
    return glide_args, training_args


def logged_losses(output_dir: Path) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


# --- the command end to end ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(target_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli_run")
    output_dir, results = run_dir / "draft", run_dir / "results.json"
    flags = cli_flags(
        target_dir, output_dir,
        "--max-steps", "4", "--packing", "--anchor-offset", "--eval-split-fraction", "0.1",
        "--eval-strategy", "steps", "--eval-steps", "2", "--save-steps", "2", "--logging-steps", "1",
        "--acceptance-eval-prompts", "2", "--acceptance-eval-max-new-tokens", "6", "--output-json", str(results),
    )  # fmt: skip
    status = main(["train", *flags])
    return status, output_dir, json.loads(results.read_text())


def test_cli_trains_and_saves_a_draft_only_checkpoint(cli_run):
    status, output_dir, _ = cli_run
    assert status == 0
    weights = draft_weights(output_dir)
    assert weights and not [key for key in weights if "target." in key]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "README.md", "trainer_state.json"):
        assert (output_dir / name).is_file(), name
    assert (output_dir / "checkpoint-4" / "model.safetensors").is_file()


def test_cli_output_loads_as_a_draft_of_its_target(cli_run, target_dir):
    _, output_dir, _ = cli_run
    draft = GlideForCausalLM.from_pretrained(output_dir)  # the target comes from the saved config
    assert draft.config.target_name_or_path == target_dir
    reloaded = {name: tensor for name, tensor in draft.state_dict().items() if not name.startswith("model.target.")}
    saved = draft_weights(output_dir)
    assert reloaded.keys() == saved.keys()
    assert all(torch.equal(reloaded[name], saved[name]) for name in saved)


def test_cli_logs_acceptance_beside_the_eval_loss(cli_run):
    _, output_dir, results = cli_run
    # Plain decoding gives 1.0 token per target forward; a round accepts at most `num_draft_tokens` (5) + 1.
    assert 1.0 <= results["metrics"][ACCEPTANCE_METRIC] <= 6.0
    assert "eval_loss" in results["metrics"] and "train_loss" in results["metrics"]
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    eval_steps = [entry["step"] for entry in history if "eval_loss" in entry]
    acceptance_steps = [entry["step"] for entry in history if ACCEPTANCE_METRIC in entry]
    # Every 2 steps; the evaluation of the last step is reused for the final metrics, not run again.
    assert eval_steps == acceptance_steps == [2, 4]


def test_cli_dry_run_prints_the_config_and_trains_nothing(target_dir, tmp_path, capsys):
    output_dir = tmp_path / "never_written"
    status = main(["train", *cli_flags(target_dir, output_dir, "--max_steps", "7", "--anchor-offset", "--dry-run")])
    config = json.loads(capsys.readouterr().out)
    assert status == 0
    assert config["glide"]["target"] == target_dir and config["glide"]["anchor_offset"] is True
    assert config["training"]["max_steps"] == 7
    assert config["resolved"]["target_dtype"] == "float32"  # on CPU
    assert not output_dir.exists()


def test_cli_reports_an_unknown_attention_backend_in_one_line(target_dir, tmp_path, capsys):
    status = main(
        ["train", *cli_flags(target_dir, tmp_path / "out", "--max_steps", "1", "--attn_implementation", "bogus")]
    )
    error = capsys.readouterr().err
    assert status == 1
    assert error.startswith(
        "glide-hf train: error: `--attn-implementation bogus` (`attn_implementation='bogus'`) cannot load the target"
    )


def test_cli_reads_a_config_file_and_later_flags_override_it(target_dir, tmp_path, capsys):
    config_file = tmp_path / "stage.yaml"
    config_file.write_text(
        f"target: {target_dir}\ndata: [{DATA_FILE}]\nlearning_rate: 5e-4\nmax_steps: 3\ndataloader_pin_memory: false\n"
    )
    status = main(["train", str(config_file), "--max-steps", "9", "--output-dir", str(tmp_path), "--dry-run"])
    config = json.loads(capsys.readouterr().out)
    assert status == 0
    assert config["training"]["learning_rate"] == 5e-4  # a YAML 1.1 string, converted by the flag's type
    assert config["training"]["max_steps"] == 9
    assert config["glide"]["data"] == [str(DATA_FILE)]
    assert config["training"]["dataloader_pin_memory"] is False  # a flag with a `--no_*` twin


def test_cli_rejects_unknown_config_keys_and_bad_values(target_dir, tmp_path, capsys):
    config_file = tmp_path / "bad.json"
    config_file.write_text(json.dumps({"target": target_dir, "data": [str(DATA_FILE)], "max_lenght": 10}))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config_file), "--dry-run"])
    assert exit_info.value.code == 2 and "unknown keys" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *cli_flags(target_dir, tmp_path, "--overflow", "wrap", "--dry-run")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *cli_flags(target_dir, tmp_path, "--max-length", "1", "--dry-run")])
    assert exit_info.value.code == 2 and "`max_length` must be at least 2" in capsys.readouterr().err


def test_cli_reports_bad_data_in_one_line_and_exits_1(target_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": oops}\n')
    flags = cli_flags(target_dir, tmp_path / "out", "--max-steps", "1")
    flags[flags.index("--data") + 1] = str(data)
    assert main(["train", *flags]) == 1
    assert f"glide-hf train: error: {data}:2: not valid JSON" in capsys.readouterr().err


@pytest.fixture
def no_bf16_here(monkeypatch):
    """This machine as one without a bf16 GPU or TPU, for TrainingArguments' check and glide_hf's."""
    import transformers.training_args

    import glide_hf.trainer

    for module in (transformers.training_args, glide_hf.trainer):
        monkeypatch.setattr(module, "is_torch_bf16_gpu_available", lambda: False)
        monkeypatch.setattr(module, "is_torch_xla_available", lambda *args, **kwargs: False)


def test_dry_run_prints_a_bf16_config_on_a_machine_without_a_gpu(no_bf16_here, tmp_path, capsys):
    """New-user audit: `--dry-run` of a bf16 stage config on a machine without a GPU exited 2 with TrainingArguments'
    "Your setup doesn't support bf16/gpu"; it checks the config before GPU time is spent, so it prints it, bf16 on."""
    config_file = EXAMPLE_CONFIGS[0]
    status = main(["train", str(config_file), "--output-dir", str(tmp_path / "out"), "--dry-run"])
    config = json.loads(capsys.readouterr().out)
    assert status == 0
    assert config["training"]["bf16"] is True and config["training"]["use_cpu"] is False  # what the run will use
    assert config["resolved"]["target_dtype"] == "bfloat16"  # as on the GPU it needs
    assert config["resolved"]["hardware_note"].startswith("The run needs hardware this machine lacks: `bf16` needs")


def test_dry_run_without_a_gpu_still_reports_other_training_argument_errors(no_bf16_here, tmp_path, capsys):
    config_file = EXAMPLE_CONFIGS[0]
    flags = ["--output-dir", str(tmp_path / "out"), "--warmup-steps", "-1", "--dry-run"]
    with pytest.raises(SystemExit) as raised:
        main(["train", str(config_file), *flags])
    assert raised.value.code == 2 and "warmup_steps >= 0" in capsys.readouterr().err
    # fp16 with bf16 is refused by TrainingArguments only after the hardware check: not hidden by turning bf16 off.
    with pytest.raises(SystemExit) as raised:
        main(["train", str(config_file), "--output-dir", str(tmp_path / "out"), "--fp16", "--dry-run"])
    assert raised.value.code == 2


def test_a_real_run_of_a_bf16_config_without_a_gpu_is_still_refused(no_bf16_here, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["train", str(EXAMPLE_CONFIGS[0]), "--output-dir", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert raised.value.code == 2 and "--bf16 needs a GPU with bf16" in error and "--bf16 false" in error
    # Another error of the same run is reported as itself, not as the hardware one.
    with pytest.raises(SystemExit) as raised:
        main(["train", str(EXAMPLE_CONFIGS[0]), "--output-dir", str(tmp_path / "out"), "--warmup-steps", "-1"])
    assert raised.value.code == 2 and "warmup_steps >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("config_file", EXAMPLE_CONFIGS, ids=lambda path: path.stem)
def test_example_stage_configs_parse(config_file, capsys):
    # `--use-cpu`: the configs ask for bf16, which TrainingArguments refuses on a machine without a GPU.
    assert main(["train", str(config_file), "--use-cpu", "--dry-run"]) == 0
    config = json.loads(capsys.readouterr().out)
    stage = config_file.stem.rsplit("-", 1)[1]
    assert config["glide"]["anchor_offset"] is (stage == "stage1")
    assert (config["glide"]["init_draft"] is None) is (stage == "stage1")


def test_example_configs_cover_three_stages_for_two_targets():
    assert len(EXAMPLE_CONFIGS) == 6


def test_build_loads_an_fp32_draft_on_a_frozen_target_with_the_chosen_attention(target_dir, tmp_path):
    glide_args, training_args = arguments(target_dir, tmp_path / "out", "--attn-implementation", "eager")
    draft = build_glide_trainer(glide_args, training_args).model
    assert draft.config._attn_implementation == draft.target.config._attn_implementation == "eager"
    assert {p.dtype for p in draft.parameters() if p.requires_grad} == {torch.float32}
    assert not any(p.requires_grad for p in draft.target.parameters())


# --- multi-stage training --------------------------------------------------------------------------------------------


def test_init_draft_continues_from_the_saved_draft(cli_run, target_dir, tmp_path, monkeypatch):
    _, stage1_dir, _ = cli_run
    monkeypatch.chdir(os.path.dirname(target_dir))  # the target given as a relative folder
    relative_target = os.path.basename(target_dir)
    glide_args, training_args = arguments(relative_target, tmp_path / "stage2", "--init-draft", str(stage1_dir))
    trainer = build_glide_trainer(glide_args, training_args)
    saved = draft_weights(stage1_dir)
    current = trainer.model.state_dict()
    assert all(torch.equal(current[name], tensor) for name, tensor in saved.items())
    assert all(current[name].dtype == torch.float32 for name in saved)
    # The continued draft names this run's target by its absolute path: it loads from any working folder.
    assert trainer.model.config.target_name_or_path == target_dir


def test_init_draft_for_another_target_shape_is_an_error(make_draft, tiny_qwen2_path, target_dir, tmp_path):
    other_draft = tmp_path / "qwen2_draft"
    make_draft(tiny_qwen2_path).save_pretrained(other_draft)
    glide_args, training_args = arguments(target_dir, tmp_path / "out", "--init-draft", str(other_draft))
    with pytest.raises(TargetMismatchError, match=r"`init_draft` .*qwen2_draft.* another shape.*vocab_size"):
        train_glide(glide_args, training_args)


def test_init_draft_rejects_another_sliding_window(cli_run, target_dir, tmp_path):
    _, stage1_dir, _ = cli_run
    flags = ("--init-draft", str(stage1_dir), "--sliding-window", "3")
    with pytest.raises(ValueError, match="`sliding_window=3` contradicts the `init_draft` checkpoint"):
        build_glide_trainer(*arguments(target_dir, tmp_path / "out", *flags))


# --- resume ----------------------------------------------------------------------------------------------------------


def test_resume_reproduces_an_uninterrupted_run(target_dir, tmp_path):
    flags = ("--max-steps", str(RESUME_STEPS), "--save-steps", str(CHECKPOINT_STEP), "--logging-steps", "1")
    flags += ("--anchor-offset",)
    uninterrupted_dir = tmp_path / "uninterrupted"
    train_glide(*arguments(target_dir, uninterrupted_dir, *flags))

    resumed_dir = tmp_path / "resumed"
    checkpoint = resumed_dir / f"checkpoint-{CHECKPOINT_STEP}"
    shutil.copytree(uninterrupted_dir / checkpoint.name, checkpoint)
    checkpoint_written = (checkpoint / "model.safetensors").stat().st_mtime_ns
    train_glide(*arguments(target_dir, resumed_dir, *flags, "--resume"))

    # Resumed, not retrained from scratch: the checkpoint was not saved again, and steps after it lost the same.
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == checkpoint_written
    losses = [logged_losses(path)[CHECKPOINT_STEP:] for path in (uninterrupted_dir, resumed_dir)]
    assert losses[0] == losses[1] and len(losses[0]) == RESUME_STEPS - CHECKPOINT_STEP
    uninterrupted, resumed = draft_weights(uninterrupted_dir), draft_weights(resumed_dir)
    assert resumed.keys() == uninterrupted.keys()
    # Same data order (seeded sampler, trained batches skipped), same Anchor-Offset draws (seeded per row), same lags
    # (RNG state restored), optimizer and scheduler restored: on CPU the same ops give the same floats. The tolerance
    # only absorbs summation-order noise, were a kernel to pick another blocking.
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


# --- what a run must not destroy ------------------------------------------------------------------------------------


def test_cli_refuses_the_target_folder_as_output_dir(target_dir, tmp_path, capsys):
    files_before = sorted(path.name for path in Path(target_dir).iterdir())
    flags = cli_flags(target_dir, Path(target_dir), "--max-steps", "1")
    flags[flags.index("--data-cache-dir") + 1] = str(tmp_path / "data_cache")
    assert main(["train", *flags]) == 1
    assert "is the `target` folder" in capsys.readouterr().err
    assert sorted(path.name for path in Path(target_dir).iterdir()) == files_before


def test_cli_refuses_to_start_a_new_run_over_an_earlier_one_unless_told(cli_run, target_dir, tmp_path, capsys):
    """A folder with checkpoints or a saved draft is continued with `--resume` or replaced with
    `--overwrite-output-dir`; without either, nothing in it is touched."""
    _, trained_dir, _ = cli_run
    earlier = tmp_path / "earlier"
    shutil.copytree(trained_dir, earlier)
    weights_before = (earlier / "model.safetensors").read_bytes()
    assert main(["train", *cli_flags(target_dir, earlier, "--max-steps", "1")]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (earlier / "model.safetensors").read_bytes() == weights_before
    assert main(["train", *cli_flags(target_dir, earlier, "--max-steps", "1", "--overwrite-output-dir")]) == 0
    assert (earlier / "model.safetensors").read_bytes() != weights_before


def test_cli_refuses_to_resume_from_a_checkpoint_without_optimizer_state(cli_run, target_dir, tmp_path, capsys):
    """A checkpoint without its optimizer (`--save-only-model`, or cut short) would restart warm-up and the
    optimizer: refused, with the way to continue from its weights."""
    _, trained_dir, _ = cli_run
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(trained_dir / "checkpoint-2", checkpoint)
    (checkpoint / "optimizer.pt").unlink()
    flags = cli_flags(target_dir, tmp_path / "out", "--max-steps", "4", "--resume-from-checkpoint", str(checkpoint))
    assert main(["train", *flags]) == 1
    error = capsys.readouterr().err
    assert "lacks optimizer.pt (the optimizer state):" in error and "--init-draft" in error


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--acceptance-eval-prompt-length", "0"], "`acceptance_eval_prompt_length` must be >= 1"),
        (["--max-steps", "-1", "--num-train-epochs", "0"], "nothing to train"),
        (["--max-steps", "3", "--save-steps", "0"], "`--save-steps` must be positive"),
    ],
)
def test_cli_refuses_values_that_would_crash_later_or_train_nothing(target_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as raised:
        main(["train", *cli_flags(target_dir, tmp_path / "out", *extra, "--dry-run")])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_a_broken_yaml_config_file_as_a_parser_error(tmp_path, capsys):
    config_file = tmp_path / "stage.yaml"
    config_file.write_text("target: [unclosed\n")
    with pytest.raises(SystemExit) as raised:
        main(["train", str(config_file)])
    assert raised.value.code == 2
    assert f"cannot read the config file {config_file}" in capsys.readouterr().err
