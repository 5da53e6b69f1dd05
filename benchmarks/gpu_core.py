"""GPU check of the core model at Llama-3-8B shape (random bf16 weights): training forward+backward time and peak
memory for each loss implementation, and the cost of one draft forward against one target forward.

Run on a CUDA machine: `python benchmarks/gpu_core.py --out DIR`. Prints a table and writes `gpu_core.json`.
"""

import argparse
import json
import os
import time

import torch
from model_shapes import LLAMA3_8B
from transformers import LlamaConfig, LlamaForCausalLM

from glide_hf import GlideForCausalLM


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--seq-lens", default="2048,8192")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        target = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B, dtype=torch.bfloat16)).to(torch.bfloat16).eval()
        draft = GlideForCausalLM.from_target(target, sliding_window=512).cuda()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    results["transformers"] = transformers.__version__
    rows = []
    draft.train()
    for seq_len in [int(s) for s in args.seq_lens.split(",")]:
        ids = torch.randint(0, LLAMA3_8B["vocab_size"], (1, seq_len), device="cuda")
        for implementation in ("plain", "chunked", "liger"):
            draft.config.loss_implementation = implementation

            def step(ids=ids):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = draft(ids, labels=ids, draft_lag=2).loss
                loss.backward()
                draft.zero_grad(set_to_none=True)

            try:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                seconds = timed(step, args.repeats)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                rows.append(
                    dict(
                        seq_len=seq_len,
                        loss=implementation,
                        tokens_per_s=seq_len / seconds,
                        step_ms=1000 * seconds,
                        peak_extra_gib=peak,
                    )
                )
            except Exception as error:  # report and go on: one failing variant must not hide the others
                rows.append(dict(seq_len=seq_len, loss=implementation, error=f"{type(error).__name__}: {error}"))
            torch.cuda.empty_cache()
    results["training"] = rows
    draft.eval()
    with torch.no_grad():
        prompt = torch.randint(0, LLAMA3_8B["vocab_size"], (1, 1024), device="cuda")
        out = target(prompt, use_cache=True)
        cache = out.cache
        token = prompt[:, -1:]
        target_ms = 1000 * timed(lambda: (target(token, cache=cache, use_cache=True), cache.crop(-1)), 10)
        draft_ms = 1000 * timed(lambda: draft(token, target_cache=cache), 10)
    results["decode"] = dict(
        context=1024, target_step_ms=target_ms, draft_step_ms=draft_ms, draft_over_target=draft_ms / target_ms
    )
    with open(os.path.join(args.out, "gpu_core.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"{results['device']} | torch {results['torch']} | transformers {results['transformers']}")
    print(f"{'seq':>6} {'loss':>8} {'tok/s':>10} {'step ms':>9} {'peak GiB':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['seq_len']:>6} {row['loss']:>8} {row['error'][:80]}")
        else:
            print(
                f"{row['seq_len']:>6} {row['loss']:>8} {row['tokens_per_s']:>10.0f} {row['step_ms']:>9.1f} "
                f"{row['peak_extra_gib']:>9.2f}"
            )
    decode = results["decode"]
    print(
        f"decode @1k: target step {decode['target_step_ms']:.2f} ms, draft step {decode['draft_step_ms']:.2f} ms "
        f"({100 * decode['draft_over_target']:.1f}%) [eager PyTorch, no CUDA graphs]"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
