"""The GPU benchmark scripts run end to end with `--tiny` (a small model on the CPU), so that a broken script is
caught here rather than on scarce device time, and what they check along the way (the engine's greedy output equals
the target's) holds on the CPU too.

Each script runs in a fresh interpreter from benchmarks/, as the device scripts run it, with the Hub switched off.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_SECONDS = 300  # the whole engine_gpu.py --tiny takes about 20 s on two cores


def run_benchmark(script: str, out: Path, *flags: str) -> dict:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
        "PYTHONPATH": str(REPO_ROOT / "src"),
        "CUDA_VISIBLE_DEVICES": "",  # --tiny is the CPU smoke run even where a GPU is present
    }
    result = subprocess.run(
        [sys.executable, script, "--tiny", "--out", str(out), *flags],
        cwd=REPO_ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
    )  # fmt: skip
    assert result.returncode == 0, f"{script} --tiny failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return {"stdout": result.stdout}


@pytest.mark.slow
def test_engine_benchmark_runs_with_tiny_and_its_greedy_checks_pass(tmp_path):
    run_benchmark("engine_gpu.py", tmp_path)
    results = json.loads((tmp_path / "engine_gpu.json").read_text())
    exactness = {key: value for key, value in results.items() if key.startswith("greedy_identical_")}
    assert len(exactness) == 4 and all(exactness.values()), exactness  # chain and tree, masked and split
    assert results["draft_cache_bytes_long"] == results["steps_64"]["draft_cache_bytes"]  # constant draft memory
    for accepted in (1, 2, 3, 4, 5):
        # Forced acceptance k gives k drafts and one target token per round (the last round may be cut short).
        assert accepted < results[f"engine_forced_{accepted}_tau"] <= accepted + 1
        assert results[f"engine_forced_{accepted}_tok_s"] > 0
    for batch in (1, 4, 16):
        assert results[f"batch_{batch}_engine_forced3_tok_s"] > 0


def test_quick_engine_benchmark_writes_its_steps(tmp_path):
    run_benchmark("engine_gpu.py", tmp_path, "--quick", "--quick-contexts", "256")
    results = json.loads((tmp_path / "engine_gpu_quick.json").read_text())
    for context in (64, 256):
        steps = results[f"steps_{context}"]
        for nodes in (1, 8, 32, 64):
            assert steps[f"split_{nodes}_graph_ms"] > 0 and steps[f"verify_{nodes}_graph_ms"] > 0
        assert steps["draft_step_quarter_vocab_graph_ms"] > 0
    assert 4 < results["engine_forced_3.5_tau"] <= 4.5


def test_call_profile_accounts_for_the_whole_call(tmp_path):
    run_benchmark("profile_generate_call.py", tmp_path, "--new-tokens", "16", "40")
    results = json.loads((tmp_path / "profile_generate_call.json").read_text())
    for new_tokens, mode in itertools.product(("16", "40"), ("kept", "captured")):
        call = results["calls"][new_tokens][mode]
        assert call["new_tokens"] == int(new_tokens)
        phases = call["phases_ms"]
        assert call["phase_counts"]["prefill (target and draft, eager)"] == 1
        assert call["phase_counts"]["eager round"] >= 1  # no CUDA graphs on the CPU
        # The top-level phases and "the rest" add up to the call (indented names are parts of another phase).
        top_level = [milliseconds for name, milliseconds in phases.items() if not name.startswith(" ")]
        assert sum(top_level) == pytest.approx(call["total_ms"], rel=1e-6)
