"""The CPU demo (`python -m glide_hf.demo`) at toy size: it runs end to end, and greedy assisted decoding with the
trained GLIDE draft reproduces the target's own greedy output exactly."""

import json
import logging

import pytest

from glide_hf import demo

# Toy sizes: a 2-layer hidden-32 target and a few training steps, so a whole run takes seconds. The time budgets
# are only a safety net here; the step budgets end both trainings.
TINY_FLAGS = [
    "--corpus_max_bytes", "150000",
    "--num_eval_files", "3",
    "--vocab_size", "300",
    "--seq_len", "32",
    "--hidden_size", "32",
    "--intermediate_size", "64",
    "--num_hidden_layers", "2",
    "--num_attention_heads", "4",
    "--num_key_value_heads", "2",
    "--target_batch_size", "8",
    "--target_max_steps", "20",
    "--target_max_seconds", "60",
    "--target_warmup_steps", "2",
    "--sliding_window", "8",
    "--num_draft_tokens", "3",
    "--max_draft_lag", "3",
    "--draft_batch_size", "8",
    "--draft_max_steps", "10",
    "--draft_max_seconds", "60",
    "--draft_warmup_steps", "2",
    "--draft_logging_steps", "5",
    "--num_eval_sequences", "4",
    "--num_eval_prompts", "2",
    "--prompt_tokens", "12",
    "--max_new_tokens", "12",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_results() -> demo.DemoResults:
    return demo.run_demo(demo.parse_args(TINY_FLAGS))


def test_greedy_assisted_output_equals_target_output(tiny_results):
    assert tiny_results.outputs_identical
    assert tiny_results.num_mismatched_prompts == 0
    assert tiny_results.new_tokens > 0


def test_tokens_per_target_forward_counts_target_calls(tiny_results):
    # Plain greedy decoding runs the target once per new token; a round of assisted decoding yields at least one.
    assert tiny_results.target_forwards_vanilla == tiny_results.new_tokens
    assert 1.0 <= tiny_results.tokens_per_target_forward <= 3 + 1
    assert 1.0 <= tiny_results.engine_tokens_per_target_forward <= 3 + 1
    assert tiny_results.target_train_steps == 20
    assert tiny_results.draft_train_steps == 10


def test_draft_training_lowers_draft_loss(tiny_results):
    assert tiny_results.draft_eval_loss_after < tiny_results.draft_eval_loss_before


def test_main_returns_zero_prints_table_and_restores_logging(tmp_path, capsys):
    package_logger = logging.getLogger("glide_hf")
    handlers_before, level_before = list(package_logger.handlers), package_logger.level
    output_json = tmp_path / "results.json"

    assert demo.main([*TINY_FLAGS, "--output_json", str(output_json)]) == 0

    assert "greedy outputs identical" in capsys.readouterr().out
    results = json.loads(output_json.read_text())
    assert results["outputs_identical"] is True
    assert results["tokens_per_target_forward"] >= 1.0
    assert package_logger.handlers == handlers_before
    assert package_logger.level == level_before


def test_main_rejects_max_draft_lag_below_num_draft_tokens(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--num_draft_tokens", "5", "--max_draft_lag", "2"])
    assert exit_info.value.code == 2
    assert "max_draft_lag" in capsys.readouterr().err


def test_training_budget_stops_at_max_steps_and_decays_learning_rate():
    budget = demo.TrainingBudget(max_steps=10, max_seconds=3600.0, warmup_steps=2, min_lr_ratio=0.1)
    budget.start()
    assert budget.lr_factor(0) == pytest.approx(0.5)  # warm-up
    assert budget.lr_factor(1) > budget.lr_factor(5) > budget.lr_factor(9)
    assert not budget.exhausted(9)
    assert budget.exhausted(10)
    assert budget.lr_factor(10) == pytest.approx(0.1)
