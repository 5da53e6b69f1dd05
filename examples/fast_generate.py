"""The GLIDE engine, `draft.generate()`: a batch of prompts, chain / tree / CAPE drafts, acceptance statistics.

Decodes a batch of chat prompts twice, with plain `target.generate` and with `draft.generate(...,
return_dict_in_generate=True)`, and prints tau (tokens per target forward), throughput, speedup, and whether the greedy
outputs are identical. `--output-json` writes the measurement in the format the model card generator reads
(`glide_hf.model_card`, `examples/push_to_hub.py --results`).

Run:
    python examples/fast_generate.py --target Qwen/Qwen2.5-7B-Instruct \
        --draft runs/glide-qwen2.5-7b-instruct/stage3 --strategy tree --tree-widths 4 16 16 16 16
    python examples/fast_generate.py --strategy cape --num-draft-tokens 5 --do-sample --temperature 0.7
    python examples/fast_generate.py --tiny   # a random tiny target and draft on the CPU, nothing downloaded

Greedy outputs are identical to the target's in fp32. In bf16 the verify pass (many tokens at once) rounds
differently from one-token decoding steps, so a near-tie can flip a token, as in any speculative decoder.
"""

import argparse
import datetime
import json
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from glide_hf import GlideConfig, GlideForCausalLM

DEFAULT_DRAFT = "runs/glide-qwen2.5-7b-instruct/stage3"
DEFAULT_PROMPTS = [
    "Write a Python function that merges two sorted lists.",
    "Explain the difference between a process and a thread in three sentences.",
    "Summarise the plot of Hamlet in one paragraph.",
    "List five uses of a hash map, with one line each.",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--target", help="Hub id or folder of the target model (default: the one the draft's config.json names)."
    )
    parser.add_argument("--draft", default=DEFAULT_DRAFT, help="Hub id or folder of a GLIDE draft for the target.")
    parser.add_argument("--prompts", help="A text file with one prompt per line (default: four built-in prompts).")
    parser.add_argument("--strategy", choices=("chain", "tree", "cape"), default="chain", help="`draft_strategy`.")
    parser.add_argument("--num-draft-tokens", type=int, help="Chain / CAPE depth (default: the draft's config).")
    parser.add_argument("--tree-widths", type=int, nargs="+", help="Nodes per tree level (default 4 16 16 16 16).")
    parser.add_argument("--cape-bins", type=int, nargs="+", help="CAPE candidates per confidence decile (11 values).")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--do-sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=0.7, help="With --do-sample.")
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Replay each round as a CUDA graph (`use_cuda_graphs`; default: on when the inputs are on CUDA).",
    )
    parser.add_argument("--output-json", help="Write the measurement here (model card results format).")
    parser.add_argument("--tiny", action="store_true", help="Random tiny target and draft on the CPU.")
    args = parser.parse_args(argv)
    if args.tree_widths and args.strategy != "tree":
        parser.error("--tree-widths applies to --strategy tree")
    if args.cape_bins and args.strategy != "cape":
        parser.error("--cape-bins applies to --strategy cape")
    return args


def load(args: argparse.Namespace):
    """`(target, draft, tokenizer, prompts)`: bf16 on a GPU, fp32 on the CPU."""
    if args.tiny:
        from _tiny import TINY_PROMPTS, build_byte_tokenizer, build_tiny_target

        target = build_tiny_target("llama")
        draft = GlideForCausalLM.from_target(target, sliding_window=32)  # untrained: exact output, low acceptance
        return target, draft.eval(), build_byte_tokenizer(), TINY_PROMPTS
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.target is None:  # the target the draft was trained for, as its config.json names it
        args.target = GlideConfig.from_pretrained(args.draft).target_name_or_path
        if not args.target:
            raise SystemExit(f"{args.draft}'s config.json names no target (`target_name_or_path`): pass --target.")
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype, device_map=device)
    draft = GlideForCausalLM.from_pretrained(args.draft, target_model=target).to(device)
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as handle:
            prompts = [line.strip() for line in handle if line.strip()]
    return target, draft.eval(), AutoTokenizer.from_pretrained(args.target), prompts


def new_tokens_of(sequences: torch.Tensor, prompt_width: int, eos_token_ids: list[int]) -> list[list[int]]:
    """Each row's generated tokens, up to and including its first end-of-sequence token."""
    rows = []
    for row in sequences[:, prompt_width:].tolist():
        end = next((index + 1 for index, token in enumerate(row) if token in eos_token_ids), len(row))
        rows.append(row[:end])
    return rows


def timed(function):
    """`(result, seconds)` of `function()`, synchronising CUDA around it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    target, draft, tokenizer, prompts = load(args)
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    texts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in conversations]
    # Left padding: every row's last prompt token sits in the last column, where generation starts.
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(
        target.device
    )
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, pad_token_id=tokenizer.pad_token_id)
    if args.do_sample:
        settings["temperature"] = args.temperature
    engine = dict(
        draft_strategy=args.strategy,
        num_draft_tokens=args.num_draft_tokens,
        use_cuda_graphs=args.cuda_graphs,
        tree_widths=tuple(args.tree_widths) if args.tree_widths else None,
        cape_bins=tuple(args.cape_bins) if args.cape_bins else None,
    )

    if target.device.type == "cuda":  # warm-up: kernels, allocator, the first CUDA graph capture
        target.generate(**inputs, **{**settings, "max_new_tokens": 8})
        draft.generate(**inputs, **{**settings, "max_new_tokens": 8}, **engine)
    torch.manual_seed(0)
    baseline, baseline_seconds = timed(lambda: target.generate(**inputs, **settings))
    torch.manual_seed(0)
    output, seconds = timed(lambda: draft.generate(**inputs, **settings, **engine, return_dict_in_generate=True))

    eos = target.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    width = inputs["input_ids"].shape[1]
    baseline_rows, rows = new_tokens_of(baseline, width, eos), new_tokens_of(output.sequences, width, eos)
    baseline_tokens, engine_tokens = sum(map(len, baseline_rows)), int(output.new_tokens.sum())
    # tau per sequence: a row's new tokens over the target forwards it took part in (the prefill, then one per
    # round until it finished; `accepted_per_round` is -1 after that). `output.tokens_per_target_forward` divides
    # the whole batch's tokens by the batch's forwards instead, which is tau only at batch size 1.
    rounds_per_row = (output.accepted_per_round >= 0).sum(0)
    tau = (output.new_tokens.float() / (rounds_per_row + 1)).mean().item()
    result = {
        "dataset": args.prompts or "built-in prompts",
        "draft_strategy": args.strategy,
        "num_draft_tokens": args.num_draft_tokens or draft.config.num_draft_tokens,
        "tree_widths": args.tree_widths,
        "temperature": args.temperature if args.do_sample else 0.0,
        "batch_size": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "tau": tau,
        "tokens_per_second": engine_tokens / seconds,
        "baseline_tokens_per_second": baseline_tokens / baseline_seconds,
    }
    result["speedup"] = result["tokens_per_second"] / result["baseline_tokens_per_second"]
    print(
        f"{args.strategy}: {output.num_rounds} rounds, {output.num_target_forwards} target forwards for the batch "
        f"({output.tokens_per_target_forward:.2f} tokens each); tau {tau:.2f} tokens per target forward per row"
    )
    print(
        f"engine {result['tokens_per_second']:.1f} tokens/s, plain generate "
        f"{result['baseline_tokens_per_second']:.1f} tokens/s: speedup {result['speedup']:.2f}x"
    )
    print(f"accepted drafts per round, row 0: {output.accepted_per_round[:, 0].tolist()[:20]}")
    identical = None
    if not args.do_sample:
        identical = sum(row == expected for row, expected in zip(rows, baseline_rows))
        print(f"greedy outputs identical to plain generate: {identical} of {len(rows)} rows")
    print("--- row 0:\n" + tokenizer.decode(rows[0], skip_special_tokens=True))

    if args.output_json:
        device = torch.cuda.get_device_name() if target.device.type == "cuda" else "cpu"
        record = {
            "device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
            "results": [result],
        }  # fmt: skip
        with open(args.output_json, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
        print(f"wrote {args.output_json}")
    # In fp32 (--tiny) the greedy outputs must be identical.
    return 1 if args.tiny and identical is not None and identical != len(rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
