"""Speculative decoding through Transformers' own API: `target.generate(..., assistant_model=draft)`.

Loads a target and its GLIDE draft, then decodes one chat prompt three ways and compares them:

1. plain greedy `target.generate`;
2. greedy assisted decoding with the draft: the same tokens, in fewer target forward passes;
3. sampled assisted decoding: the target's own distribution (`temperature`, `top_p` as usual).

This is the stock path: batch size 1, a chain of `num_draft_tokens` drafts per round (the draft's
`generation_config.json`). For batches, trees and CUDA graphs use the GLIDE engine (`examples/fast_generate.py`).

Run:
    python examples/assisted_generation.py --target Qwen/Qwen2.5-7B-Instruct \
        --draft runs/glide-qwen2.5-7b-instruct/stage3
    python examples/assisted_generation.py --tiny   # a random tiny target and draft on the CPU, nothing downloaded
"""

import argparse
import time
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from glide_hf import GlideConfig, GlideForCausalLM

# Where `examples/train_glide.py` and the stage configs in examples/configs/ leave the trained draft.
DEFAULT_DRAFT = "runs/glide-qwen2.5-7b-instruct/stage3"
DEFAULT_PROMPT = "Write a Python function that checks whether a string is a palindrome."


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--target", help="Hub id or folder of the target model (default: the one the draft's config.json names)."
    )
    parser.add_argument("--draft", default=DEFAULT_DRAFT, help="Hub id or folder of a GLIDE draft for the target.")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="The user message.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7, help="Temperature of the sampled run.")
    parser.add_argument("--tiny", action="store_true", help="Random tiny target and draft on the CPU.")
    return parser.parse_args(argv)


def load(args: argparse.Namespace):
    """`(target, draft, tokenizer)`: bf16 on a GPU, fp32 on the CPU."""
    if args.tiny:
        from _tiny import build_byte_tokenizer, build_tiny_target

        target = build_tiny_target("llama")
        # An untrained draft: outputs stay exact, but it accepts little (train one with examples/train_glide.py).
        draft = GlideForCausalLM.from_target(target, sliding_window=32)
        return target, draft.eval(), build_byte_tokenizer()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.target is None:  # the target the draft was trained for, as its config.json names it
        args.target = GlideConfig.from_pretrained(args.draft).target_name_or_path
        if not args.target:
            raise SystemExit(f"{args.draft}'s config.json names no target (`target_name_or_path`): pass --target.")
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype, device_map=device)
    # `target_model=` shares the loaded target instead of loading the one named in the draft's config again.
    # `.to(device)` moves the draft's own layer (the target is already there).
    draft = GlideForCausalLM.from_pretrained(args.draft, target_model=target).to(device)
    return target, draft.eval(), AutoTokenizer.from_pretrained(args.target)


@contextmanager
def count_forwards(model):
    """Count `model`'s forward calls inside the block (one per target pass: prefill, decode or verify)."""
    calls = [0]
    handle = model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def main(argv=None) -> int:
    args = parse_args(argv)
    target, draft, tokenizer = load(args)
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(target.device)
    prompt_length = inputs["input_ids"].shape[1]
    settings = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)

    runs = {}
    for name, extra in (("plain greedy", {}), ("assisted greedy", {"assistant_model": draft})):
        with count_forwards(target) as calls:
            start = time.perf_counter()
            output = target.generate(**inputs, do_sample=False, **settings, **extra)
            seconds = time.perf_counter() - start
        new_tokens = output.shape[1] - prompt_length
        runs[name] = output
        print(
            f"{name:16s} {new_tokens:4d} tokens, {calls[0]:4d} target forwards "
            f"({new_tokens / calls[0]:.2f} tokens per forward), {seconds:.2f} s"
        )
    identical = torch.equal(runs["plain greedy"], runs["assisted greedy"])
    print(f"greedy outputs identical: {identical}")
    print("---\n" + tokenizer.decode(runs["assisted greedy"][0, prompt_length:], skip_special_tokens=True))

    # Sampling: every emitted token is a draw from the target's (processed) distribution.
    torch.manual_seed(0)
    sampled = target.generate(
        **inputs, assistant_model=draft, do_sample=True, temperature=args.temperature, top_p=0.95, **settings
    )
    print(f"--- sampled (temperature {args.temperature}):")
    print(tokenizer.decode(sampled[0, prompt_length:], skip_special_tokens=True))
    return 0 if identical or not args.tiny else 1


if __name__ == "__main__":
    raise SystemExit(main())
