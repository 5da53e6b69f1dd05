"""Training a GLIDE draft with a stock `transformers.Trainer`: the draft learns, the frozen target stays frozen,
checkpoints hold the draft only, resuming reproduces an uninterrupted run, and activation checkpointing works. A
tokenizer with more tokens than the target's embedding has rows is refused before training; bad data paths are
refused before the target loads, and choices outside a `Literal` field when the arguments are built.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import Trainer, TrainingArguments

from glide_hf import GlideForCausalLM

FIRST_TOKEN = 3  # ids 0-2 are pad, bos and eos
PERIOD = 61
SEQUENCE_LENGTH = 24
NUM_SEQUENCES = 64
TRAIN_STEPS = 40
# A resumed run restarts at CHECKPOINT_STEP and trains to RESUME_STEPS.
CHECKPOINT_STEP = 3
RESUME_STEPS = 6


class CountingDataset(torch.utils.data.Dataset):
    """Sequences that count up by one modulo `PERIOD` from a random start: each token fixes the next one."""

    def __init__(self, num_sequences: int = NUM_SEQUENCES, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, PERIOD, (num_sequences, 1), generator=generator)
        self.input_ids = FIRST_TOKEN + (starts + torch.arange(SEQUENCE_LENGTH)) % PERIOD

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index]}


def training_arguments(output_dir: Path, **overrides) -> TrainingArguments:
    fields = {
        "output_dir": str(output_dir),
        "max_steps": TRAIN_STEPS,
        "per_device_train_batch_size": 8,
        # High and constant: the frozen random LM head has small logits, so the draft must scale its output up fast.
        "learning_rate": 0.1,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    return TrainingArguments(**{**fields, **overrides})


def make_trainer(draft: GlideForCausalLM, output_dir: Path, **overrides) -> Trainer:
    return Trainer(model=draft, args=training_arguments(output_dir, **overrides), train_dataset=CountingDataset())


def draft_state(model: GlideForCausalLM) -> dict[str, torch.Tensor]:
    """The draft's own tensors (what a checkpoint holds), detached and copied."""
    return {
        name: tensor.detach().clone() for name, tensor in model.state_dict().items() if ".target." not in f".{name}"
    }


def logged_losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@dataclass
class TrainingRun:
    trainer: Trainer
    draft: GlideForCausalLM
    draft_before: dict[str, torch.Tensor]
    target_before: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def training_run(tiny_target_path, make_draft, tmp_path_factory) -> TrainingRun:
    draft = make_draft(tiny_target_path)
    draft_before = draft_state(draft)
    target_before = {name: tensor.clone() for name, tensor in draft.target.state_dict().items()}
    trainer = make_trainer(draft, tmp_path_factory.mktemp("train"))
    trainer.train()
    return TrainingRun(trainer=trainer, draft=draft, draft_before=draft_before, target_before=target_before)


def test_trainer_loss_falls_on_predictable_corpus(training_run):
    losses = logged_losses(training_run.trainer)
    assert len(losses) == TRAIN_STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # From about ln(vocab) ~ 6 to below 2 in practice: the draft learns the successor of each token.
    assert last < 0.5 * first, (first, last)


def test_trainer_optimizer_holds_exactly_the_draft_trainable_params(training_run):
    optimized = [param for group in training_run.trainer.optimizer.param_groups for param in group["params"]]
    trainable = [param for param in training_run.draft.parameters() if param.requires_grad]
    target_ids = {id(param) for param in training_run.draft.target.parameters()}
    assert len(optimized) == len({id(param) for param in optimized}) == len(trainable)
    assert {id(param) for param in optimized} == {id(param) for param in trainable}
    assert not target_ids & {id(param) for param in optimized}


def test_trainer_updates_every_draft_tensor(training_run):
    after = draft_state(training_run.draft)
    unchanged = [name for name, before in training_run.draft_before.items() if torch.equal(before, after[name])]
    assert not unchanged


def test_trainer_leaves_target_weights_unchanged(training_run):
    after = training_run.draft.target.state_dict()
    assert after.keys() == training_run.target_before.keys()
    changed = [name for name, before in training_run.target_before.items() if not torch.equal(before, after[name])]
    assert not changed


def test_trainer_leaves_target_in_eval_mode(training_run):
    target = training_run.draft.target
    assert not target.training
    assert not [name for name, module in target.named_modules() if module.training]


# --- checkpoints and resume -----------------------------------------------------------------------------------------


@dataclass
class ResumeRuns:
    output_dir: Path
    uninterrupted: dict[str, torch.Tensor]
    resumed: dict[str, torch.Tensor]
    resumed_without_rng_state: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def resume_runs(tiny_target_path, make_draft, tmp_path_factory) -> ResumeRuns:
    """Train to `RESUME_STEPS` in one go (saving every `CHECKPOINT_STEP` steps), then twice more from the checkpoint
    at `CHECKPOINT_STEP`: once as saved, once with its `rng_state.pth` removed."""
    arguments = {"max_steps": RESUME_STEPS, "save_strategy": "steps", "save_steps": CHECKPOINT_STEP}
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    draft = make_draft(tiny_target_path)
    make_trainer(draft, output_dir, **arguments).train()
    uninterrupted = draft_state(draft)
    checkpoint = output_dir / f"checkpoint-{CHECKPOINT_STEP}"

    draft = make_draft(tiny_target_path)
    make_trainer(draft, tmp_path_factory.mktemp("resumed"), **arguments).train(resume_from_checkpoint=str(checkpoint))
    resumed = draft_state(draft)

    checkpoint_without_rng = tmp_path_factory.mktemp("no_rng") / checkpoint.name
    shutil.copytree(checkpoint, checkpoint_without_rng)
    (checkpoint_without_rng / "rng_state.pth").unlink()
    draft = make_draft(tiny_target_path)
    make_trainer(draft, tmp_path_factory.mktemp("resumed_without_rng"), **arguments).train(
        resume_from_checkpoint=str(checkpoint_without_rng)
    )
    return ResumeRuns(output_dir, uninterrupted, resumed, draft_state(draft))


def test_trainer_checkpoint_holds_draft_weights_only(resume_runs):
    checkpoint = resume_runs.output_dir / f"checkpoint-{CHECKPOINT_STEP}"
    with safe_open(checkpoint / "model.safetensors", framework="pt") as weights:
        keys = set(weights.keys())
    assert not [key for key in keys if "target." in key]
    assert keys == set(resume_runs.uninterrupted)


def test_trainer_checkpoint_reloads_with_the_trained_draft_weights(resume_runs):
    checkpoint = resume_runs.output_dir / f"checkpoint-{RESUME_STEPS}"
    reloaded = draft_state(GlideForCausalLM.from_pretrained(checkpoint))
    assert reloaded.keys() == resume_runs.uninterrupted.keys()
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in resume_runs.uninterrupted.items())


def test_resume_from_checkpoint_reproduces_uninterrupted_run(resume_runs):
    # Exact, not approximate: Trainer restores the torch RNG from `rng_state.pth` after skipping the trained batches
    # (trainer.py `_load_rng_state`), so the random training lags drawn after the checkpoint are the same, and the
    # optimizer and scheduler states are restored bit for bit; on CPU the same ops then give the same floats.
    assert resume_runs.resumed.keys() == resume_runs.uninterrupted.keys()
    differing = [
        name
        for name, tensor in resume_runs.uninterrupted.items()
        if not torch.equal(resume_runs.resumed[name], tensor)
    ]
    assert not differing


def test_resume_relies_on_checkpointed_rng_state_for_training_lag(resume_runs):
    # Control for the test above: the lag is drawn from torch's global RNG in training mode, so without the saved RNG
    # state the resumed steps draw other lags and end at other weights. Data order does not depend on that RNG
    # (accelerate's seedable sampler is seeded from `seed` and the epoch).
    differing = [
        name
        for name, tensor in resume_runs.uninterrupted.items()
        if not torch.equal(resume_runs.resumed_without_rng_state[name], tensor)
    ]
    assert differing


# --- activation checkpointing --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_short_run(tiny_llama_path, make_draft, tmp_path_factory) -> dict[str, torch.Tensor]:
    draft = make_draft(tiny_llama_path)
    make_trainer(draft, tmp_path_factory.mktemp("plain"), max_steps=RESUME_STEPS).train()
    assert not draft.model.layer.gradient_checkpointing
    return draft_state(draft)


@pytest.mark.parametrize("argument", ["activation_checkpointing", "gradient_checkpointing"])
def test_activation_checkpointing_trains_to_the_same_weights(
    plain_short_run, tiny_llama_path, make_draft, tmp_path, argument
):
    draft = make_draft(tiny_llama_path)
    trainer = make_trainer(draft, tmp_path, max_steps=RESUME_STEPS, **{argument: True})
    trainer.train()
    assert draft.model.layer.gradient_checkpointing
    assert all(torch.isfinite(torch.tensor(logged_losses(trainer))))
    after = draft_state(draft)
    # Recomputing the layer in backward replays the same ops on the same inputs (the lag is drawn outside the
    # checkpointed layer, and there is no dropout), so the weights match exactly.
    assert not [name for name, tensor in plain_short_run.items() if not torch.equal(after[name], tensor)]


@pytest.mark.parametrize(("variable", "sharded"), [("true", True), ("1", True), ("false", False), (None, False)])
def test_acceptance_evaluation_is_skipped_under_an_fsdp_launch(monkeypatch, tmp_path, variable, sharded):
    """`accelerate launch` with an FSDP config leaves `TrainingArguments.fsdp` empty and says so in the environment:
    the acceptance evaluation must see it (one process cannot run sharded weights)."""
    from glide_hf.trainer import _weights_are_sharded

    if variable is None:
        monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", variable)
    assert _weights_are_sharded(TrainingArguments(output_dir=str(tmp_path), report_to=[])) is sharded


@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_fsdp_needs_a_full_state_dict_for_draft_only_checkpoints(monkeypatch, state_dict_type):
    """accelerate runs FSDP on GPUs only, so Trainer's setup is stood in for: the check reads what it leaves."""
    from types import SimpleNamespace

    from glide_hf import GlideConfigError
    from glide_hf.trainer import GlideTrainer

    def fsdp_trainer_init(self, *args, **kwargs):
        self.is_fsdp_enabled = True
        plugin = SimpleNamespace(state_dict_type=f"StateDictType.{state_dict_type}")
        self.accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))

    monkeypatch.setattr(Trainer, "__init__", fsdp_trainer_init)
    if state_dict_type == "FULL_STATE_DICT":
        GlideTrainer()
    else:
        with pytest.raises(GlideConfigError, match="fsdp_state_dict_type: FULL_STATE_DICT"):
            GlideTrainer()


# --- tokenizer and target -------------------------------------------------------------------------------------------

TINY_LLAMA_VOCAB_SIZE = 512  # conftest.py


def tokenizer_with(num_tokens: int):
    """The byte-level tokenizer of tiny_tokenizer.py (263 tokens) grown to `num_tokens` with added special tokens."""
    from tiny_tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    extra = [f"<|extra_{index}|>" for index in range(num_tokens - len(tokenizer))]
    tokenizer.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    assert len(tokenizer) == num_tokens
    return tokenizer


def build_with_tokenizer(target: str, tokenizer: str | None, tmp_path: Path):
    from tiny_training import DATA_FILE

    from glide_hf.trainer import GlideTrainingArguments, build_glide_trainer

    glide_args = GlideTrainingArguments(
        target=target,
        data=[str(DATA_FILE)],
        tokenizer=tokenizer,
        max_length=32,
        data_cache_dir=str(tmp_path / "cache"),
    )
    return build_glide_trainer(glide_args, training_arguments(tmp_path / "out", max_steps=1))


@pytest.mark.parametrize("num_tokens", [263, TINY_LLAMA_VOCAB_SIZE])
def test_a_tokenizer_within_the_target_vocabulary_is_accepted(target_dir, tmp_path, num_tokens):
    tokenizer_with(num_tokens).save_pretrained(tmp_path / "tokenizer")
    trainer = build_with_tokenizer(target_dir, str(tmp_path / "tokenizer"), tmp_path)
    assert len(trainer.processing_class) == num_tokens


def test_a_tokenizer_larger_than_the_target_vocabulary_is_refused(target_dir, tmp_path):
    from glide_hf import GlideConfigError

    # One added special token past the embedding's 512 rows: its id, 512, has no row.
    tokenizer_with(TINY_LLAMA_VOCAB_SIZE + 1).save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(GlideConfigError, match=r"has 513 tokens .*`vocab_size=512`.*own tokenizer") as raised:
        build_with_tokenizer(target_dir, str(tmp_path / "tokenizer"), tmp_path)
    assert f"`{tmp_path / 'tokenizer'}`" in str(raised.value)


def test_a_target_folder_whose_own_tokenizer_outgrew_its_vocabulary_is_refused(target_dir, tmp_path):
    from glide_hf import GlideConfigError

    target = tmp_path / "target"
    shutil.copytree(target_dir, target)
    tokenizer_with(TINY_LLAMA_VOCAB_SIZE + 1).save_pretrained(target)
    with pytest.raises(GlideConfigError, match=r"tokenizer of the target .* has 513 tokens .*`--tokenizer`"):
        build_with_tokenizer(str(target), None, tmp_path)


# --- arguments and data paths, checked before the target loads ------------------------------------------------------


def build_with_data(monkeypatch, tmp_path: Path, data: list[str], eval_data: list[str] | None = None):
    """`build_glide_trainer` with a `load_target` that fails the test: a data error must come before it."""
    import glide_hf.trainer
    from glide_hf.trainer import GlideTrainingArguments, build_glide_trainer

    def load_target(*args, **kwargs):
        raise AssertionError("the target was loaded before the data paths were checked")

    monkeypatch.setattr(glide_hf.trainer, "load_target", load_target)
    glide_args = GlideTrainingArguments(target="never-loaded", data=data, eval_data=eval_data, max_length=32)
    return build_glide_trainer(glide_args, training_arguments(tmp_path / "out", max_steps=1))


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("missing.jsonl", "DataNotFoundError", "does not exist"),
        ("no_match_*.jsonl", "DataNotFoundError", "No file matches"),
        ("notes.txt", "DataFormatError", "unsupported file type"),
        ("plain_folder", "DataNotFoundError", "is a folder but not a dataset"),
    ],
)
def test_bad_data_paths_are_reported_before_the_target_loads(monkeypatch, tmp_path, name, error, message):
    # New-user audit: these were reported only once the target had loaded (minutes for a 7B model).
    import glide_hf

    (tmp_path / "notes.txt").write_text("some text\n")
    (tmp_path / "plain_folder").mkdir()
    with pytest.raises(getattr(glide_hf, error), match=message):
        build_with_data(monkeypatch, tmp_path, [str(tmp_path / name)])


def test_a_missing_eval_data_file_is_reported_before_the_target_loads(monkeypatch, tmp_path):
    from tiny_training import DATA_FILE

    from glide_hf import DataNotFoundError

    with pytest.raises(DataNotFoundError, match="eval.jsonl` does not exist"):
        build_with_data(monkeypatch, tmp_path, [str(DATA_FILE)], eval_data=[str(tmp_path / "eval.jsonl")])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("overflow", "wrap", "`overflow` must be one of 'truncate', 'drop', got 'wrap'"),
        ("data_format", "jsonl", "`data_format` must be one of 'auto', 'text', 'chat', 'source_target', got 'jsonl'"),
        ("target_dtype", "bf16", "`target_dtype` must be one of 'auto', 'bfloat16', 'float16', 'float32'"),
        ("loss_implementation", "fast", r"'plain' \(or None\), got 'fast'"),
    ],
)
def test_training_arguments_refuse_a_choice_outside_their_literal(field, value, message):
    # New-user audit: from Python (no argparse `choices`), `overflow="wrap"` failed only while tokenizing.
    from glide_hf import GlideConfigError
    from glide_hf.trainer import GlideTrainingArguments

    with pytest.raises(GlideConfigError, match=message):
        GlideTrainingArguments(target="t", data=["d.jsonl"], **{field: value})


def test_an_output_dir_error_names_the_fields_beside_the_flags(tmp_path):
    # New-user audit: from Python, "Pass `--resume` / `--overwrite-output-dir`" named only the command-line flags.
    from glide_hf import GlideConfigError
    from glide_hf.trainer import GlideTrainingArguments, check_output_dir

    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "model.safetensors").write_bytes(b"")
    glide_args = GlideTrainingArguments(target="t", data=["d.jsonl"])
    with pytest.raises(GlideConfigError, match="already holds a run") as raised:
        check_output_dir(glide_args, training_arguments(output_dir))
    message = str(raised.value)
    assert "`--resume` (`resume=True`) to continue it" in message
    assert "`--overwrite-output-dir` (`overwrite_output_dir=True`) to replace it" in message
    assert message.endswith("or another `--output-dir` (`output_dir`).")
