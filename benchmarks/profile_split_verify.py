"""Which kernels does a split verify forward add with more tree nodes? Profiles the target's verify forward at
Llama-3-8B shape (random bf16, the engine's slot cache, Triton split attention, the target's norms in Triton as the
engine runs them) and prints, per node count, the CUDA kernels by time per forward. Run on a CUDA machine:
`python benchmarks/profile_split_verify.py --context 16384 --nodes 1 64 [--out DIR]` (DIR gets the full tables)."""

import argparse
import os

import torch
from model_shapes import LLAMA3_8B
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from glide_hf.norm_kernel import triton_rms_norms
from glide_hf.static_cache import SlotCache
from glide_hf.tree_attention import TREE_ATTENTION, TreeAttentionInputs, using_tree_attention

FORWARDS = 5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rows", type=int, default=14, help="kernels printed per node count")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        target = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B)).to(torch.bfloat16).eval()
    slots = args.context + 128
    cache = SlotCache.allocate(32, 1, 8, slots, 128, torch.bfloat16, "cuda")
    lengths = torch.tensor([args.context], device="cuda")
    with torch.no_grad(), triton_rms_norms(target):
        for nodes in args.nodes:
            tokens = torch.randint(3, 1000, (1, nodes), device="cuda")
            positions = lengths[:, None] + torch.arange(nodes, device="cuda")[None]
            cache.set_write_slots(positions)
            visible = torch.ones(1, nodes, nodes, dtype=torch.bool, device="cuda").tril()

            def verify(tokens=tokens, positions=positions, visible=visible):
                tree = TreeAttentionInputs.build(lengths, positions, visible, slots, "triton")
                with using_tree_attention(target.config):
                    return target(
                        input_ids=tokens,
                        position_ids=positions,
                        attention_mask=visible[:, None],
                        cache=cache,
                        use_cache=True,
                        logits_to_keep=tokens.shape[1],
                        **{TREE_ATTENTION: tree},
                    ).logits

            for _ in range(3):
                verify()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(FORWARDS):
                    verify()
                torch.cuda.synchronize()
            events = [event for event in prof.key_averages() if event.self_device_time_total > 0]
            events.sort(key=lambda event: event.self_device_time_total, reverse=True)
            total = sum(event.self_device_time_total for event in events) / FORWARDS / 1000
            print(f"\n=== {nodes} nodes at {args.context} context: {total:.2f} ms of kernels per forward ===")
            for event in events[: args.rows]:
                per_forward = event.self_device_time_total / FORWARDS / 1000
                print(f"{per_forward:7.3f} ms {event.count // FORWARDS:5d}x  {event.key[:90]}")
            if args.out:
                with open(os.path.join(args.out, f"profile_{args.context}_{nodes}.txt"), "w") as handle:
                    handle.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
