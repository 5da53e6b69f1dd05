"""Where the time of one `draft.generate()` call goes, at Llama-3-8B shape (random bf16 weights), batch 1.

The engine's per-token cost is its replayed rounds; each call also pays its set-up and the eager prefill, and the
capture of its round's CUDA graph unless an earlier call with the same settings left it (`engine._KeptRound`). This
times those phases on the second of two identical calls (the first warms kernels and the round's code path, as a
process serving requests would have), twice: replaying the round the first call kept ("kept"), and after
`draft.release_cuda_graphs()`, capturing it again ("captured"). Each phase is timed by wrapping the engine's
functions and bracketed by device synchronisations, so the sum is slightly above an unwrapped call's wall time.

Run: `python benchmarks/profile_generate_call.py --out DIR` (prints a table, writes profile_generate_call.json);
`--tiny` checks the script on the CPU with a small model (no graphs there: every round is eager).
"""

import argparse
import collections
import functools
import json
import os
import time

import torch
from engine_gpu import DEVICE, LLAMA3_8B, TINY, build, prompt_of, synchronize

from glide_hf import engine


def instrument(timings: dict, counts: dict):
    """Wrap the engine's phases with timers; returns a function that undoes it."""
    originals = {
        "_prefill": engine._prefill,
        "_compile_triton_kernels": engine._compile_triton_kernels,
        "step": engine._RoundRunner.step,
    }

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            synchronize()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            synchronize()
            timings[name] += time.perf_counter() - start
            counts[name] += 1
            return result

        return wrapper

    def step(runner):
        if not runner.call.use_cuda_graphs:
            phase = "eager round"
        elif runner.call.policy.num_nodes in runner.graphs:
            phase = "replayed round"
        else:
            phase = "captured round (warm-up or capture, then one replay)"
        return timed(phase, originals["step"])(runner)

    engine._prefill = timed("prefill (target and draft, eager)", originals["_prefill"])
    engine._compile_triton_kernels = timed(
        "  Triton pre-launch (inside the captured round)", originals["_compile_triton_kernels"]
    )
    engine._RoundRunner.step = step

    def restore():
        engine._prefill = originals["_prefill"]
        engine._compile_triton_kernels = originals["_compile_triton_kernels"]
        engine._RoundRunner.step = originals["step"]

    return restore


def profile_call(draft, prompt, new_tokens: int, capture: bool) -> dict:
    arguments = dict(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        num_draft_tokens=5,
        forced_acceptance=3.5,
        return_dict_in_generate=True,
    )
    draft.generate(prompt, **arguments)  # warms the kernels and the round's code path
    if capture:
        draft.release_cuda_graphs()
    timings, counts = collections.defaultdict(float), collections.defaultdict(int)
    restore = instrument(timings, counts)
    try:
        synchronize()
        start = time.perf_counter()
        out = draft.generate(prompt, **arguments)
        synchronize()
        total = time.perf_counter() - start
    finally:
        restore()
    accounted = sum(seconds for name, seconds in timings.items() if not name.startswith("  "))
    timings["rest (set-up, host loop, output)"] = total - accounted
    counts["rest (set-up, host loop, output)"] = 1
    return {
        "new_tokens": int(out.new_tokens.sum()),
        "total_ms": 1000 * total,
        "tokens_per_second": float(out.new_tokens.sum()) / total,
        "phases_ms": {name: 1000 * seconds for name, seconds in timings.items()},
        "phase_counts": dict(counts),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--new-tokens", type=int, nargs="*", default=[128, 512])
    parser.add_argument("--tiny", action="store_true", help="small model on the CPU: a smoke test of this script")
    args = parser.parse_args()
    target, draft = build(TINY if args.tiny else LLAMA3_8B, torch.float32 if args.tiny else torch.bfloat16)
    prompt = prompt_of(128)
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    results = {"device": device_name, "torch": torch.__version__, "calls": {}}
    print(f"{device_name} | torch {torch.__version__} | 128-token prompt, 5-token chain, forced 3.5 (benchmark only)")
    for new_tokens in args.new_tokens:
        results["calls"][str(new_tokens)] = {}
        for mode in ("kept", "captured"):
            call = profile_call(draft, prompt, new_tokens, capture=mode == "captured")
            results["calls"][str(new_tokens)][mode] = call
            print(
                f"\n{new_tokens} new tokens, {mode}: {call['total_ms']:.1f} ms, {call['tokens_per_second']:.1f} tok/s"
            )
            for name, milliseconds in call["phases_ms"].items():
                count = call["phase_counts"][name]
                print(f"  {name:<58} {milliseconds:8.1f} ms  {count:4d}x")
    with open(os.path.join(args.out, "profile_generate_call.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
