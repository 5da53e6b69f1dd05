"""Which kernels does a split verify forward add with more tree nodes? Profiles the target's verify forward at
Llama-3-8B shape (random bf16, the engine's slot cache, Triton split attention) at 1k context for 1 and 8 nodes and
prints each one's CUDA kernels by total time. Run on a CUDA machine: `python benchmarks/profile_split_verify.py`."""

import torch
from model_shapes import LLAMA3_8B
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from glide_hf.static_cache import SlotCache
from glide_hf.tree_attention import TREE_ATTENTION, TreeAttentionInputs, using_tree_attention


def main() -> int:
    torch.manual_seed(0)
    with torch.device("cuda"):
        target = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B)).to(torch.bfloat16).eval()
    context, slots = 1024, 1024 + 128
    cache = SlotCache.allocate(32, 1, 8, slots, 128, torch.bfloat16, "cuda")
    lengths = torch.tensor([context], device="cuda")
    with torch.no_grad():
        for nodes in (1, 8):
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
                        **{TREE_ATTENTION: tree},
                    ).logits

            for _ in range(3):
                verify()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    verify()
                torch.cuda.synchronize()
            print(f"\n=== {nodes} nodes, 5 forwards ===")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
