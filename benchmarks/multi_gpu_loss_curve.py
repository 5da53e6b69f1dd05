"""Helpers of `multi_gpu_loss_curve.sh`: build the inputs of its runs, then compare their loss curves.

`prepare WORK`: a random Llama target (hidden 1024, 8 layers, vocab 32000, fp32 weights on disk) with the byte-level
tokenizer of tests/tiny_tokenizer.py in `WORK/target`, and `WORK/data.jsonl`: chunks of Python's own standard
library sources as `{"text"}` records (learnable text that needs no download).

`compare WORK OUT RUN=REFERENCE ...`: reads each run's `WORK/RUN/trainer_state.json`, prints the reference and the run
losses side by side with the largest difference, checks that the saved draft holds no target tensor, and writes
everything to `OUT/multi_gpu_loss_curve.json`. A run passes when its largest relative loss difference stays within
the tolerance of its precision (`TOLERANCES`); the exit status is 1 if any run failed or is missing.

`resume-check WORK OUT STEP CONFIG ...` (multi_gpu_resume.sh): for each `WORK/CONFIG`, compares the loss curve of
`resumed/` (resumed from `checkpoint-STEP`) with `uninterrupted/`, and opens every tensor file of the checkpoint and
of the resumed run's output: none may hold a tensor of the frozen target. Writes `OUT/multi_gpu_resume.json`.
"""

import argparse
import json
import sysconfig
from pathlib import Path

import torch
from safetensors import safe_open
from tiny_tokenizer import build_byte_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

TARGET = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=8, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    tie_word_embeddings=False,
)  # fmt: skip
CHUNK_CHARS = 480  # a little under the runs' max length of 512 byte tokens, so that packing joins whole chunks
NUM_CHUNKS = 4000
# Largest relative loss difference (any step) accepted against the 1-GPU run. fp32: only the order of float sums
# differs (each GPU sums over half the batch, then the all-reduce adds the halves) and cuBLAS may pick other kernels
# for the halved batch; bf16: bf16 rounding of those sums too, and FSDP2/DeepSpeed cast the weights themselves.
TOLERANCES = {"fp32": 1e-3, "bf16": 3e-2}


def prepare(work: Path) -> None:
    torch.manual_seed(0)
    target = LlamaForCausalLM(LlamaConfig(**TARGET)).eval()
    target.save_pretrained(work / "target")
    build_byte_tokenizer().save_pretrained(work / "target")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    num_chunks = 0
    with open(work / "data.jsonl", "w", encoding="utf-8") as data:
        for path in sorted(stdlib.glob("*.py")):
            text = path.read_text(encoding="utf-8", errors="ignore")
            for start in range(0, len(text) - CHUNK_CHARS, CHUNK_CHARS):
                data.write(json.dumps({"text": text[start : start + CHUNK_CHARS]}) + "\n")
                num_chunks += 1
                if num_chunks == NUM_CHUNKS:
                    print(f"prepared {work / 'target'} and {num_chunks} chunks of {stdlib} in {work / 'data.jsonl'}")
                    return
    raise SystemExit(f"only {num_chunks} chunks in {stdlib}, expected {NUM_CHUNKS}")


def losses(run_dir: Path) -> list[float] | None:
    state = run_dir / "trainer_state.json"
    if not state.is_file():
        return None
    history = json.loads(state.read_text())["log_history"]
    return [entry["loss"] for entry in sorted(history, key=lambda e: e["step"]) if "loss" in entry]


def target_keys_in_draft(run_dir: Path) -> int | None:
    weights = run_dir / "model.safetensors"
    return target_tensors_in(weights) if weights.is_file() else None


def compare(work: Path, out: Path, pairs: list[str]) -> int:
    results, all_passed = {}, True
    for pair in pairs:
        run, reference = pair.split("=")
        precision = "bf16" if "bf16" in run else "fp32"
        run_losses, reference_losses = losses(work / run), losses(work / reference)
        result = {"reference": reference, "precision": precision, "losses": run_losses}
        result["target_keys_in_saved_draft"] = target_keys_in_draft(work / run)
        if run_losses is None or reference_losses is None or len(run_losses) != len(reference_losses):
            result["passed"] = False
            print(f"\n{run} vs {reference}: missing or unequal curves ({run_losses=}, {reference_losses=})")
        else:
            diffs = [abs(a - b) for a, b in zip(run_losses, reference_losses)]
            relative = max(d / abs(b) for d, b in zip(diffs, reference_losses))
            result.update(max_abs_diff=max(diffs), max_rel_diff=relative, tolerance=TOLERANCES[precision])
            result["passed"] = relative <= TOLERANCES[precision] and result["target_keys_in_saved_draft"] == 0
            print(f"\n{run} vs {reference} ({precision}): step, reference loss, run loss, difference")
            for step, (b, a) in enumerate(zip(reference_losses, run_losses), start=1):
                print(f"  {step:4d}  {b:.6f}  {a:.6f}  {a - b:+.2e}")
            print(
                f"  max |diff| {max(diffs):.3e}, max relative {relative:.3e} (tolerance {TOLERANCES[precision]:g}), "
                f"target tensors in the saved draft: {result['target_keys_in_saved_draft']} -> "
                f"{'PASS' if result['passed'] else 'FAIL'}"
            )
        all_passed &= result["passed"]
        results[run] = result
    for reference in sorted({pair.split("=")[1] for pair in pairs}):
        results[reference] = {"losses": losses(work / reference)}
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "runs": results,
    }
    (out / "multi_gpu_loss_curve.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out / 'multi_gpu_loss_curve.json'}; all passed: {all_passed}")
    return 0 if all_passed else 1


# Largest relative loss difference between a resumed run and the uninterrupted one: both replay the same steps on
# the same GPUs from the same states, so only nondeterministic kernels (atomics in reductions) may differ.
RESUME_TOLERANCE = 5e-3


def target_tensors_in(path: Path) -> int:
    """How many tensors of the frozen target (keys with `target.`) a checkpoint file holds, nested dicts included."""
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as handle:
            return sum("target." in key for key in handle.keys())

    def count(value, key: str) -> int:
        if isinstance(value, torch.Tensor):
            return int("target." in key)
        if isinstance(value, dict):
            return sum(count(item, f"{key}.{name}") for name, item in value.items())
        if isinstance(value, (list, tuple)):
            return sum(count(item, f"{key}.{index}") for index, item in enumerate(value))
        return 0

    return count(torch.load(path, map_location="cpu", weights_only=False), "")


def inspect_folder(folder: Path) -> dict:
    """Every tensor file under `folder` (recursively): its target tensors; and the folder's size on disk."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".safetensors", ".bin", ".pt", ".pth") and path.is_file():
            info = {"bytes": path.stat().st_size, "target_tensors": target_tensors_in(path)}
            files[str(path.relative_to(folder))] = info
    return {
        "files": files,
        "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        "target_tensors": sum(f["target_tensors"] for f in files.values()),
    }


def resume_check(work: Path, out: Path, checkpoint_step: int, configs: list[str]) -> int:
    target_bytes = sum(p.stat().st_size for p in (work / "target").glob("*.safetensors"))
    results, all_passed = {}, True
    for config in configs:
        uninterrupted, resumed = losses(work / config / "uninterrupted"), losses(work / config / "resumed")
        checkpoint = work / config / "uninterrupted" / f"checkpoint-{checkpoint_step}"
        result = {
            "uninterrupted_losses": uninterrupted,
            "resumed_losses": resumed,
            "checkpoint": inspect_folder(checkpoint) if checkpoint.is_dir() else None,
            "output": inspect_folder(work / config / "resumed") if (work / config / "resumed").is_dir() else None,
        }
        passed = bool(uninterrupted) and bool(resumed) and len(uninterrupted) == len(resumed)
        passed &= result["checkpoint"] is not None and result["output"] is not None
        passed = passed and "model.safetensors" in result["output"]["files"]
        if passed:
            relative = max(abs(a - b) / abs(b) for a, b in zip(resumed, uninterrupted))
            result["max_rel_diff"] = relative
            passed = relative <= RESUME_TOLERANCE
            passed &= result["checkpoint"]["target_tensors"] == 0 and result["output"]["target_tensors"] == 0
            print(f"\n{config}: step, uninterrupted loss, resumed loss (resumed from step {checkpoint_step})")
            for step, (a, b) in enumerate(zip(uninterrupted, resumed), start=1):
                print(f"  {step:4d}  {a:.6f}  {b:.6f}  {b - a:+.2e}")
            print(
                f"  checkpoint-{checkpoint_step}: {result['checkpoint']['bytes'] / 2**20:.1f} MiB on disk (target "
                f"weights {target_bytes / 2**20:.1f} MiB), target tensors: {result['checkpoint']['target_tensors']}"
            )
            for name, info in result["checkpoint"]["files"].items():
                print(f"    {name}: {info['bytes'] / 2**20:.1f} MiB, target tensors {info['target_tensors']}")
            print(f"  resumed output folder: target tensors {result['output']['target_tensors']}")
            print(
                f"  max relative loss difference {relative:.3e} (tolerance {RESUME_TOLERANCE:g}) -> "
                f"{'PASS' if passed else 'FAIL'}"
            )
        else:
            print(f"\n{config}: missing run or checkpoint: {result}")
        result["passed"] = passed
        all_passed &= passed
        results[config] = result
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "target_weights_bytes": target_bytes,
        "checkpoint_step": checkpoint_step,
        "runs": results,
    }
    (out / "multi_gpu_resume.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out / 'multi_gpu_resume.json'}; all passed: {all_passed}")
    return 0 if all_passed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare").add_argument("work", type=Path)
    compare_parser = commands.add_parser("compare")
    compare_parser.add_argument("work", type=Path)
    compare_parser.add_argument("out", type=Path)
    compare_parser.add_argument("pairs", nargs="+", help="RUN=REFERENCE folder names under WORK")
    resume_parser = commands.add_parser("resume-check")
    resume_parser.add_argument("work", type=Path)
    resume_parser.add_argument("out", type=Path)
    resume_parser.add_argument("checkpoint_step", type=int)
    resume_parser.add_argument("configs", nargs="+", help="folders under WORK, each with uninterrupted/ and resumed/")
    args = parser.parse_args()
    if args.command == "resume-check":
        return resume_check(args.work, args.out, args.checkpoint_step, args.configs)
    if args.command == "prepare":
        args.work.mkdir(parents=True, exist_ok=True)
        prepare(args.work)
        return 0
    return compare(args.work, args.out, args.pairs)


if __name__ == "__main__":
    raise SystemExit(main())
