"""Where does a one-token verify step go? Times the target's 1-token forward at Llama-3-8B shape (random bf16) with
Transformers' dynamic cache, with the engine's slot cache and boolean mask, and with a float mask; then prints the
top CUDA kernels of the slot-cache step. Run on a CUDA machine: `python benchmarks/profile_verify.py`."""

import time

import torch
from model_shapes import LLAMA3_8B
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from glide_hf.static_cache import SlotCache


def timed(fn, repeats=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> int:
    torch.manual_seed(0)
    with torch.device("cuda"):
        target = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B)).to(torch.bfloat16).eval()
    context = 1024
    prompt = torch.randint(3, 1000, (1, context), device="cuda")
    token = prompt[:, -1:]
    with torch.no_grad():
        dynamic = DynamicCache(config=target.config)
        target(prompt, cache=dynamic, use_cache=True)

        def dynamic_step():
            target(token, cache=dynamic, use_cache=True)
            dynamic.crop(-1)

        slots = context + 256
        keys = dynamic.layers[0].keys
        slot_cache = SlotCache.allocate(32, 1, 8, slots, 128, keys.dtype, "cuda")
        for slot_layer, layer in zip(slot_cache.layers, dynamic.layers):
            slot_layer.keys[:, :, :context] = layer.keys
            slot_layer.values[:, :, :context] = layer.values
        position = torch.tensor([[context]], device="cuda")
        slot_cache.set_write_slots(position)
        bool_mask = (torch.arange(slots, device="cuda") <= context)[None, None, None]
        float_mask = torch.zeros(bool_mask.shape, dtype=torch.bfloat16, device="cuda").masked_fill(
            ~bool_mask, torch.finfo(torch.bfloat16).min
        )

        def slot_step(mask):
            target(input_ids=token, position_ids=position, attention_mask=mask, cache=slot_cache, use_cache=True)

        results = {
            "dynamic cache, no mask": timed(dynamic_step),
            "slot cache, bool mask": timed(lambda: slot_step(bool_mask)),
            "slot cache, float mask": timed(lambda: slot_step(float_mask)),
        }
        for name, ms in results.items():
            print(f"{name:>24}: {ms:.2f} ms")
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                slot_step(bool_mask)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                dynamic_step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
