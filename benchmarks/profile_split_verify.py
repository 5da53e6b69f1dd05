"""Where does the time of a verify forward and of a draft step go? At Llama-3-8B shape (random bf16, the engine's
slot cache after a real prefill, Triton split attention, the target's norms in Triton and the fused draft, as the
engine runs them), prints the CUDA kernels by time per call: the split verify forward per node count, then the draft
step. Run on a CUDA machine:
`python benchmarks/profile_split_verify.py --context 16384 --nodes 1 64 [--out DIR]` (DIR gets the full tables)."""

import argparse
import os

import torch
from engine_gpu import LLAMA3_8B, build, prompt_of, split_step
from torch.profiler import ProfilerActivity, profile
from transformers import GenerationConfig

from glide_hf.engine import _draft_step, _prefill
from glide_hf.norm_kernel import triton_rms_norms
from glide_hf.tree import chain

CALLS = 5


def profile_kernels(fn, title: str, rows: int, out: str | None, name: str) -> None:
    """Print `fn`'s CUDA kernels by total time per call (top `rows`); the full table goes to `out/name`."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    events = [event for event in prof.key_averages() if event.self_device_time_total > 0]
    events.sort(key=lambda event: event.self_device_time_total, reverse=True)
    total = sum(event.self_device_time_total for event in events) / CALLS / 1000
    print(f"\n=== {title}: {total:.3f} ms of kernels per call ===")
    for event in events[:rows]:
        per_call = event.self_device_time_total / CALLS / 1000
        print(f"{per_call:7.3f} ms {event.count // CALLS:5d}x  {event.key[:90]}")
    if out:
        with open(os.path.join(out, name), "w") as handle:
            handle.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rows", type=int, default=14, help="kernels printed per profile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    target, draft = build(LLAMA3_8B, torch.bfloat16)
    prompt = prompt_of(args.context)
    config = GenerationConfig(do_sample=False, max_new_tokens=8)
    with torch.no_grad(), triton_rms_norms(target), draft.fused_for_inference():
        call, rows, _ = _prefill(draft, target, chain(1), config, prompt, torch.ones_like(prompt), 80, [], None, None)
        slots = call.target_cache.num_slots
        for nodes in args.nodes:
            tokens = torch.randint(3, 1000, (1, nodes), device="cuda")
            positions = rows.lengths[:, None] + torch.arange(nodes, device="cuda")[None]
            call.target_cache.set_write_slots(positions)
            visible = torch.ones(1, nodes, nodes, dtype=torch.bool, device="cuda").tril()
            profile_kernels(
                lambda: split_step(target, call, rows, tokens, positions, visible, slots, "triton"),  # noqa: B023
                f"split verify, {nodes} nodes at {args.context} context",
                args.rows,
                args.out,
                f"profile_verify_{args.context}_{nodes}.txt",
            )
        token, position = rows.roots[:, None], rows.lengths[:, None]
        ring_slots = call.draft_cache.ring_slots(position)
        profile_kernels(
            lambda: _draft_step(call, token, position, ring_slots, None, None, rows.lengths),
            f"draft step (fused, full vocabulary) at {args.context} context",
            args.rows,
            args.out,
            f"profile_draft_{args.context}.txt",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
