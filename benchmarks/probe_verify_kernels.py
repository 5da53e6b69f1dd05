"""Where does a tree verify forward lose time against a one-token step? Two probes at Llama-3-8B shape (bf16, CUDA
graphs, one H100/H200), printed as tables and written to `probe_verify_kernels.json`:

1. The split tree attention of 32 layers (`tree_attention.tree_attention_forward`) for 1, 8 and 64 queries at 1k
   and 16k context: the Triton kernels and the flash prefix (grouped query heads packed as rows of their key head),
   each with chunks sized by `prefix_chunk_slots` and at fixed chunk sizes, the flash prefix before grouping (one
   kernel row per query head, 1024-slot chunks), and sdpa over exactly the prefix (no tree, no merge) as a floor.
2. With `--gemm`: the projections of one layer and the LM head at 1, 8 and 64 rows: cuBLAS through `F.linear`, and
   Triton matmuls that `torch.compile(mode="max-autotune-no-cudagraphs")` picks.

`--sweep` instead times the Triton split at every tiling of `TILINGS` and several chunk sizes
(`probe_triton_sweep.json`).

Run: `python benchmarks/probe_verify_kernels.py --out DIR [--sweep]`.
"""

import argparse
import functools
import json
import os
import time

import torch
import torch.nn.functional as F
from engine_gpu import graph_time

from glide_hf import tree_attention
from glide_hf.static_cache import SlotCache
from glide_hf.tree_attention import TreeAttentionInputs, tree_attention_forward
from glide_hf.tree_attention_kernel import KernelConfig, default_kernel_config

LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE, VOCAB = 32, 32, 8, 128, 4096, 14336, 128256


def graph_ms(fn) -> float:
    """Median milliseconds of one replay of `fn` captured as a CUDA graph."""
    return 1000 * graph_time(fn)


def ungrouped_flash_prefix(query, key, value, inputs, scale):
    """The previous prefix path: one kernel row per query head (each head re-reads its key head), 1024-slot chunks."""
    batch, num_heads, num_queries, head_dim = query.shape
    num_slots = key.shape[2]
    chunks = inputs.chunks_for(num_heads, num_queries)  # rows per head = N; chunk_size fixed at 1024 by the caller
    num_chunks = chunks.used.shape[1]
    packed_query = query.transpose(1, 2)[:, None].expand(-1, num_chunks, -1, -1, -1).reshape(-1, num_heads, head_dim)
    packed_key = key.transpose(1, 2).reshape(batch * num_slots, key.shape[1], head_dim)
    packed_value = value.transpose(1, 2).reshape(batch * num_slots, value.shape[1], head_dim)
    output, lse, *_ = tree_attention._varlen_flash_forward(
        packed_query,
        packed_key,
        packed_value,
        chunks.query_starts,
        chunks.key_starts,
        num_queries,
        chunks.chunk_size,
        0.0,
        False,
        False,
        scale=scale,
        seqused_k=chunks.used.flatten(),
    )
    output = output.reshape(batch, num_chunks, num_queries, num_heads, head_dim).transpose(2, 3)
    lse = lse.reshape(num_heads, batch, num_chunks, num_queries).permute(1, 2, 0, 3)
    return output, lse.masked_fill((chunks.used == 0)[:, :, None, None], float("-inf"))


def split_layers(cache, query, lengths, node_slots, visible, slots, kernel, chunk_size=None, config=None) -> None:
    """32 layers of split tree attention, the inputs built once as the engine does per verify forward."""
    inputs = TreeAttentionInputs.build(lengths, node_slots, visible, slots, kernel, chunk_size, triton_config=config)
    for layer in cache.layers:
        tree_attention_forward(None, query, layer.keys, layer.values, None, glide_tree=inputs)


def sdpa_floor(cache, query, context) -> None:
    """32 layers of plain sdpa over exactly the prefix: no tree part, no merge."""
    for layer in cache.layers:
        keys, values = layer.keys[:, :, :context], layer.values[:, :, :context]
        F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)


# Triton tilings to sweep (block_m, block_n, num_warps, num_stages); each is tried where block_m <= 2 x the rows.
TILINGS = [
    (16, 64, 4, 2),
    (16, 64, 4, 3),
    (16, 128, 4, 2),
    (16, 128, 8, 3),
    (32, 64, 4, 2),
    (32, 128, 4, 3),
    (64, 64, 4, 2),
    (64, 64, 4, 3),
    (64, 128, 4, 3),
    (64, 128, 8, 3),
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
]


def attention_cases(contexts, node_counts):
    """For each context and node count: `(context, nodes, slots, cache, query, layers)`, with a 32-layer bf16 slot
    cache of random keys and `layers(kernel, chunk_size=None, config=None)` timing-ready (`split_layers`)."""
    dtype = torch.bfloat16
    for context in contexts:
        slots = context + 128
        cache = SlotCache.allocate(LAYERS, 1, KV_HEADS, slots, HEAD_DIM, dtype, "cuda")
        for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
        lengths = torch.tensor([context], device="cuda")
        for nodes in node_counts:
            query = torch.randn(1, HEADS, nodes, HEAD_DIM, device="cuda", dtype=dtype)
            node_slots = lengths[:, None] + torch.arange(nodes, device="cuda")[None]
            visible = torch.ones(nodes, nodes, dtype=torch.bool, device="cuda").tril()[None]
            layers = functools.partial(split_layers, cache, query, lengths, node_slots, visible, slots)
            yield context, nodes, slots, cache, query, layers


def triton_sweep(contexts, node_counts) -> list[dict]:
    """Every tiling and chunk size of the Triton split for each context and node count; the default marked."""
    rows = []
    for context, nodes, slots, _, _, layers in attention_cases(contexts, node_counts):
        layers = functools.partial(layers, "triton")
        query_rows = HEADS // KV_HEADS * nodes
        default = default_kernel_config(query_rows)
        timings = {"default": graph_ms(layers), "default_config": str(default)}
        for tiling in TILINGS:
            if tiling[0] > 2 * max(query_rows, 16):
                continue
            config = KernelConfig(*tiling)
            for chunk in (None, 512, 1024, 2048):
                if chunk is None or chunk < slots:
                    name = f"{tiling}/{chunk or 'auto'}"
                    timings[name] = graph_ms(functools.partial(layers, chunk, config))
        best = min((v, k) for k, v in timings.items() if isinstance(v, float))
        row = {"context": context, "nodes": nodes, "best": best, **timings}
        rows.append(row)
        print(json.dumps({"context": context, "nodes": nodes, "default": timings["default"], "best": best}))
    return rows


def attention_probe(contexts, node_counts) -> list[dict]:
    rows = []
    for context, nodes, slots, cache, query, layers in attention_cases(contexts, node_counts):
        row = {"context": context, "nodes": nodes}
        for kernel in ("triton", "flash"):
            row[f"{kernel}_auto_ms"] = graph_ms(functools.partial(layers, kernel))
            for chunk in (256, 512, 1024, 2048, 4096):
                if chunk < slots:
                    row[f"{kernel}_{chunk}_ms"] = graph_ms(functools.partial(layers, kernel, chunk))
        original = tree_attention._flash_prefix
        tree_attention._flash_prefix = ungrouped_flash_prefix
        try:
            row["previous_1024_ms"] = graph_ms(functools.partial(layers, "flash", 1024))
        finally:
            tree_attention._flash_prefix = original
        row["sdpa_floor_ms"] = graph_ms(functools.partial(sdpa_floor, cache, query, context))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


SHAPES = {
    "q": (HIDDEN, HEADS * HEAD_DIM),
    "kv": (HIDDEN, KV_HEADS * HEAD_DIM),
    "qkv": (HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM),
    "o": (HEADS * HEAD_DIM, HIDDEN),
    "gate": (HIDDEN, INTERMEDIATE),
    "gate_up": (HIDDEN, 2 * INTERMEDIATE),
    "down": (INTERMEDIATE, HIDDEN),
    "lm_head": (HIDDEN, VOCAB),
}


def linear_all(linear, x, weights) -> None:
    for weight in weights:
        linear(x, weight)


def gemm_probe(autotune: bool) -> list[dict]:
    rows = []
    for name, (fan_in, fan_out) in SHAPES.items():
        # Several copies of the weight so that no replay reads it from L2.
        copies = max(2, -(-256 * 2**20 // (fan_in * fan_out * 2)))
        weights = [torch.randn(fan_out, fan_in, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        gigabytes = fan_in * fan_out * 2 / 1e9
        for m in (1, 8, 64):
            x = torch.randn(m, fan_in, device="cuda", dtype=torch.bfloat16)
            per_call = graph_ms(functools.partial(linear_all, F.linear, x, weights)) / copies
            row = {"shape": name, "m": m, "cublas_us": 1000 * per_call, "cublas_TBps": gigabytes / per_call}
            if autotune and m in (1, 64) and name in ("qkv", "o", "gate_up", "down"):
                compiled = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
                compiled(x, weights[0])
                per_call = graph_ms(functools.partial(linear_all, compiled, x, weights)) / copies
                row.update(autotuned_us=1000 * per_call, autotuned_TBps=gigabytes / per_call)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del weights
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--gemm", action="store_true", help="also the GEMM probe (cuBLAS against max-autotune)")
    parser.add_argument("--sweep", action="store_true", help="only a sweep of the Triton split's tilings and chunks")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    started = time.perf_counter()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.sweep:
        results["triton_sweep"] = triton_sweep((1024, 16384), (1, 8, 64))
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "probe_triton_sweep.json"), "w") as handle:
            json.dump(results, handle, indent=1)
        print("\n32 layers of Triton split attention (ms, CUDA graph): default tiling, best (tiling/chunk)")
        for row in results["triton_sweep"]:
            print(f"ctx {row['context']:>6} N {row['nodes']:>3}: default {row['default']:.3f}, best {row['best']}")
        return 0
    results["attention"] = attention_probe((1024, 16384), (1, 8, 64))
    results["gemm"] = gemm_probe(autotune=True) if args.gemm else []
    results["seconds"] = time.perf_counter() - started
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_verify_kernels.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    print("\n32 layers of split attention (ms, CUDA graph):")
    for row in results["attention"]:
        print(
            f"ctx {row['context']:>6} N {row['nodes']:>3}: triton auto {row['triton_auto_ms']:.3f}, flash auto "
            f"{row['flash_auto_ms']:.3f}, previous {row['previous_1024_ms']:.3f}, floor {row['sdpa_floor_ms']:.3f} | "
            + " ".join(f"{k[:-3]}={v:.3f}" for k, v in row.items() if k[-3:] == "_ms" and k.split("_")[1].isdigit())
        )
    print("\nGEMMs (us per call, TB/s):")
    for row in results["gemm"]:
        extra = f"  autotuned {row['autotuned_us']:.1f} ({row['autotuned_TBps']:.2f})" if "autotuned_us" in row else ""
        print(f"{row['shape']:>8} m={row['m']:>2}: cublas {row['cublas_us']:.1f} ({row['cublas_TBps']:.2f}){extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
