"""The self-trained benchmark of issue 5 (`benchmarks/selftrained/run.py`) end to end in `--tiny` mode on the CPU,
so that the GPU script cannot rot: corpus, tokenizer, target, self-distillation, both drafts, every method."""

import importlib.util
import json
from pathlib import Path

import pytest

from glide_hf.bench import METHODS

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "selftrained" / "run.py"


def load_run_module():
    spec = importlib.util.spec_from_file_location("selftrained_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_selftrained_run_measures_every_method_losslessly(tmp_path, arch, capsys):
    run = load_run_module()
    out = tmp_path / "out"
    code = run.main(["--tiny", "--arch", arch, "--out", str(out), "--work-dir", str(tmp_path / "work")])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = {(row["method"], row["temperature"]): row for row in results["evaluation"]["summaries"]}
    assert set(rows) == {(method, temperature) for method in METHODS for temperature in (0.0, 0.7)}
    for (method, temperature), row in rows.items():
        assert row["error"] is None, method
        assert row["num_prompts"] == 3
        assert row["tau"] >= 1.0, method
        if temperature == 0 and method != "vanilla":
            assert row["greedy_identical"] == row["num_prompts"], f"{method}: greedy output differs from vanilla"
    assert results["evaluation"]["mismatches"] == []
    assert results["corpus"]["heldout_packages"] == ["json"]
    draft_data = results["draft_data"]  # every batch mixes greedy and sampled rows, even a budget of one batch
    assert draft_data["greedy_rows"] > 0 and draft_data["sampled_rows"] > 0, draft_data
    assert results["independent_draft"]["parameters"] > 0 and results["glide_draft"]["trainable_parameters"] > 0
    assert set(results["phases"]) == {
        "corpus",
        "tokenizer",
        "tokenize",
        "target",
        "draft data",
        "GLIDE draft",
        "independent draft",
        "evaluation",
    }
    assert (out / "results.md").read_text().count("| engine, tree |") == 2
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("| engine, CAPE | T=0.7 |")


def test_independent_draft_matches_the_glide_parameter_count():
    run = load_run_module()
    hidden, intermediate = run.independent_shape(3_476_992, vocab_size=8192, hidden_limit=512, tied=True)
    count = 8192 * hidden + 4 * hidden * hidden + 3 * hidden * intermediate + 3 * hidden
    assert hidden % run.INDEPENDENT_HEAD_DIM == 0
    assert abs(count - 3_476_992) / 3_476_992 < 0.01
