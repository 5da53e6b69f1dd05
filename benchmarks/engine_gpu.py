"""GPU benchmark of the GLIDE engine at Llama-3-8B shape (random bf16 weights), and a long-context exactness check.

Measures, in one process on one card (issue 3, item 8):
- vanilla `target.generate` tokens/s (dynamic cache, and static cache with Transformers' auto-compile);
- one draft step against one target step (1-token query, 1k context), and the draft step over a draft vocabulary of
  a quarter of the ids (`set_draft_vocabulary`);
- verification of 1, 8, 32, 64 tree nodes at 1k, 4k and 16k context, relative to a one-token step, with the split
  attention of `tree_attention.py` (prefix, tree and merge; the kernel `split_attention_kernel` picks: Triton where
  installed; the previous flash-prefix split beside it for comparison) and with the explicit mask over the slot
  buffer (`verify_attention="masked"`);
- the draft cache's bytes at 1k and 32k context;
- engine tokens/s on a 16k-token prompt at forced acceptance 3, split and masked, against vanilla `generate`;
- engine tokens/s with a 5-token chain at forced acceptance 1, 2, 3, 3.5 (rounds of 3 and 4), 4 and 5
  (BENCHMARK-ONLY switch: the engine pretends the first k drafts matched, so the output is NOT the target's; it
  isolates speed from draft quality); at forced 3.5 also with the draft over a quarter of the vocabulary, and with 4x
  as many new tokens (vanilla static `generate` rerun at that length);
- engine tokens/s at batch 1, 4 and 16 (forced acceptance 3) against vanilla `generate` at the same batch;
- greedy exactness of the engine on a 32k-token prompt (a smaller fp32 Llama, where ties cannot flip), masked and
  split (fp32: the Triton kernel where installed, else the reference prefix), and agreement of the split and masked
  engines in bf16.

Run: `python benchmarks/engine_gpu.py --out DIR` (prints a table, writes engine_gpu.json); `--forced-only` measures
only the vanilla baselines and the forced-acceptance rows (engine_gpu_forced.json); `--quick` only the steps at 1k
context (and at `--quick-contexts`) and forced 3.5 (engine_gpu_quick.json).
"""

import argparse
import functools
import json
import os
import time

import torch
from model_shapes import LLAMA3_8B as LLAMA3_8B_SHAPE
from transformers import LlamaConfig, LlamaForCausalLM

from glide_hf import GlideForCausalLM
from glide_hf.engine import glide_generate
from glide_hf.norm_kernel import triton_rms_norms
from glide_hf.tree_attention import TreeAttentionInputs, split_attention_kernel, using_tree_attention

# `--tiny` runs the whole script on the CPU with a small model, to check it before spending GPU time.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=40000,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
LLAMA3_8B = dict(LLAMA3_8B_SHAPE, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_time(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of `fn()` over `repeats` runs, with device synchronisation."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def graph_time(fn, repeats: int = 20) -> float:
    """Median seconds of one replay of `fn` captured as a CUDA graph (falls back to eager timing on the CPU)."""
    if not torch.cuda.is_available():
        return cuda_time(fn, repeats)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time(graph.replay, repeats)


def build(config_fields: dict, dtype: torch.dtype, sliding_window: int = 512):
    torch.manual_seed(0)
    with torch.device(DEVICE):
        target = LlamaForCausalLM(LlamaConfig(**config_fields)).to(dtype).eval()
        draft = GlideForCausalLM.from_target(target, sliding_window=sliding_window).to(dtype).eval()
    return target, draft


def prompt_of(length: int, batch: int = 1, vocab: int = 500) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))


def vanilla_tokens_per_second(target, prompt, new_tokens: int, **kwargs) -> float:
    def run():
        target.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)

    return prompt.shape[0] * new_tokens / cuda_time(run, repeats=3, warmup=1)


def engine_tokens_per_second(draft, prompt, new_tokens: int, **kwargs) -> tuple[float, float]:
    outputs = {}

    def run():
        outputs["out"] = glide_generate(
            draft,
            prompt,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            return_dict_in_generate=True,
            **kwargs,
        )

    seconds = cuda_time(run, repeats=5, warmup=1)
    out = outputs["out"]
    return float(out.new_tokens.sum()) / seconds, out.tokens_per_target_forward


def split_step(target, call, rows, tokens, positions, visible, slots: int, kernel: str) -> None:
    """One split verify forward of `tokens` (the engine's tree attention with `kernel`)."""
    # Built inside the timed step: the engine builds these once per verify forward too.
    tree = TreeAttentionInputs.build(rows.lengths, positions, visible, slots, kernel)
    with using_tree_attention(target.config):
        target(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=visible[:, None],
            cache=call.target_cache,
            use_cache=True,
            logits_to_keep=tokens.shape[1],
            glide_tree=tree,
        )


def chain_step_inputs(call, rows, nodes: int):
    """Random tokens for a `nodes`-long chain after the prefix, their positions (the target cache now writes there)
    and their causal visibility `[1, nodes, nodes]`."""
    tokens = torch.randint(3, 500, (1, nodes), device=DEVICE)
    positions = rows.lengths[:, None] + torch.arange(nodes, device=DEVICE)[None]
    call.target_cache.set_write_slots(positions)
    return tokens, positions, torch.ones(1, nodes, nodes, dtype=torch.bool, device=DEVICE).tril()


def step_times(target, draft, context: int) -> dict:
    """One target step (1 token) and one draft step, both reading a `context`-token target cache."""
    from transformers import GenerationConfig

    from glide_hf.engine import _draft_head, _draft_step, _prefill
    from glide_hf.tree import chain

    prompt = prompt_of(context)
    config = GenerationConfig(do_sample=False, max_new_tokens=8)
    with torch.no_grad():
        call, rows, _ = _prefill(draft, target, chain(1), config, prompt, torch.ones_like(prompt), 80, [], None, None)
        ring = call.draft_cache
        token = rows.roots[:, None]
        position = rows.lengths[:, None]

        def draft_step():  # the engine's draft step, mask building included
            _draft_step(call, token, position, ring.ring_slots(position), None, None, rows.lengths)

        results = {"draft_step_unfused_graph_ms": 1000 * graph_time(draft_step)}
        # The engine drafts with fused projections and Triton norms (`fused_for_inference`).
        with draft.fused_for_inference():
            results["draft_step_ms"] = 1000 * cuda_time(draft_step, repeats=20, warmup=3)
            results["draft_step_graph_ms"] = 1000 * graph_time(draft_step)
            # The same step over a draft vocabulary (`set_draft_vocabulary`): a quarter of the LM head's rows.
            full_head = (call.draft_vocab_ids, call.draft_head_weight, call.draft_head_bias)
            draft.set_draft_vocabulary(torch.arange(draft.config.vocab_size // 4))
            call.draft_vocab_ids, call.draft_head_weight, call.draft_head_bias = _draft_head(draft)
            results["draft_step_quarter_vocab_graph_ms"] = 1000 * graph_time(draft_step)
            draft.set_draft_vocabulary(None)
            call.draft_vocab_ids, call.draft_head_weight, call.draft_head_bias = full_head
        slots = call.target_cache.num_slots
        cache_keys = call.target_cache.layers[0].keys
        kernel = split_attention_kernel(cache_keys.device, cache_keys.dtype, cache_keys.shape[-1])
        results["split_kernel"] = kernel
        # The engine runs the target with its RMSNorms as Triton kernels (`triton_rms_norms`); so do these steps.
        with triton_rms_norms(target):
            for nodes in (1, 8, 32, 64):
                tokens, positions, visible = chain_step_inputs(call, rows, nodes)
                slot = torch.arange(slots, device=DEVICE)[None, None, None]
                causal = torch.arange(nodes, device=DEVICE)[None, None, :, None]
                mask = (slot < rows.lengths[:, None, None, None]) | (
                    (slot - rows.lengths[:, None, None, None] <= causal) & (slot >= rows.lengths[:, None, None, None])
                )

                def verify(tokens=tokens, positions=positions, mask=mask, nodes=nodes):
                    target(
                        input_ids=tokens,
                        position_ids=positions,
                        attention_mask=mask,
                        cache=call.target_cache,
                        use_cache=True,
                        logits_to_keep=nodes,
                    )

                results[f"verify_{nodes}_ms"] = 1000 * cuda_time(verify, repeats=10, warmup=2)
                results[f"verify_{nodes}_graph_ms"] = 1000 * graph_time(verify, repeats=10)
                split = functools.partial(split_step, target, call, rows, tokens, positions, visible, slots, kernel)
                results[f"split_{nodes}_ms"] = 1000 * cuda_time(split, repeats=10, warmup=2)
                results[f"split_{nodes}_graph_ms"] = 1000 * graph_time(split, repeats=10)
                if kernel == "triton":  # the previous split (flash prefix, torch tree and merge) for comparison
                    results[f"split_flash_{nodes}_graph_ms"] = 1000 * graph_time(
                        functools.partial(split_step, target, call, rows, tokens, positions, visible, slots, "flash"),
                        repeats=10,
                    )
        for nodes in (1, 64):  # the split steps with the target's own (torch) norms, for comparison
            tokens, positions, visible = chain_step_inputs(call, rows, nodes)
            split = functools.partial(split_step, target, call, rows, tokens, positions, visible, slots, kernel)
            results[f"split_{nodes}_own_norms_graph_ms"] = 1000 * graph_time(split, repeats=10)
        results["draft_cache_bytes"] = sum(
            tensor.numel() * tensor.element_size() for tensor in (ring.layers[0].keys, ring.layers[0].values)
        )
    torch.cuda.empty_cache()
    return results


def split_agrees_with_masked(draft, prompt, new_tokens: int) -> dict:
    """Greedy tokens of the engine with split (flash prefix) and masked verification, both bf16: how many agree.

    Not an exactness test: two bf16 attention kernels round differently, so a near-tie may flip a token."""
    with torch.no_grad():
        outputs = {
            attention: draft.generate(
                prompt,
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                draft_strategy="tree",
                tree_widths=(4, 8, 8, 8),
                verify_attention=attention,
            )
            for attention in ("split", "masked")
        }
    split, masked = (outputs[name][0, prompt.shape[1] :] for name in ("split", "masked"))
    differ = (split != masked).nonzero()
    return {
        "bf16_split_vs_masked_first_difference": int(differ[0, 0]) if differ.numel() else None,
        "bf16_split_vs_masked_tokens": int(split.numel()),
    }


def long_context_exactness(context: int, new_tokens: int, tiny: bool) -> dict:
    fields = (
        TINY
        if tiny
        else dict(
            LLAMA3_8B,
            hidden_size=1024,
            intermediate_size=2048,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=4096,
        )
    )
    target, draft = build(fields, torch.float32, sliding_window=64)
    prompt = prompt_of(context, vocab=fields["vocab_size"])
    with torch.no_grad():
        expected = target.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        results = {}
        for strategy, kwargs in (("chain", {}), ("tree", {"tree_widths": (4, 8, 8, 8)})):
            for attention in ("masked", "split"):
                got = draft.generate(
                    prompt,
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    draft_strategy=strategy,
                    verify_attention=attention,
                    **kwargs,
                )
                results[f"greedy_identical_{strategy}_{attention}_{context}"] = bool(torch.equal(expected, got))
    del target, draft
    torch.cuda.empty_cache()
    return results


def forced_3_5_rows(draft, prompt, new_tokens: int) -> dict:
    """Engine tokens/s and tokens per target forward at forced acceptance 3.5, with the full vocabulary and with a
    draft head over a quarter of it (forced acceptance ignores what the draft proposes, so only its cost changes)."""
    results = {}
    for name, vocabulary in (("", None), ("_quarter_vocab", torch.arange(draft.config.vocab_size // 4))):
        draft.set_draft_vocabulary(vocabulary)
        results[f"engine_forced_3.5{name}_tok_s"], results[f"engine_forced_3.5{name}_tau"] = engine_tokens_per_second(
            draft, prompt, new_tokens, num_draft_tokens=5, forced_acceptance=3.5
        )
    draft.set_draft_vocabulary(None)
    return results


def forced_acceptance_rows(target, draft, prompt, new_tokens: int) -> dict:
    """Engine tokens/s (and tokens per target forward) at forced acceptance 1-5, a 5-token chain; at 3.5 also with a
    quarter-vocabulary draft head and with 4x the new tokens (vanilla static `generate` rerun at that length)."""
    results = {}
    for accepted in (1, 2, 3, 4, 5):
        tok_s, tau = engine_tokens_per_second(
            draft, prompt, new_tokens, num_draft_tokens=5, forced_acceptance=accepted
        )
        results[f"engine_forced_{accepted}_tok_s"] = tok_s
        results[f"engine_forced_{accepted}_tau"] = tau
    results.update(forced_3_5_rows(draft, prompt, new_tokens))
    # Longer outputs spread the per-call prefill and graph capture over more tokens.
    long_output = 4 * new_tokens
    results["long_output_new_tokens"] = long_output
    results["long_output_vanilla_static_tok_s"] = vanilla_tokens_per_second(
        target, prompt, long_output, cache_implementation="static"
    )
    results["long_output_engine_forced_3.5_tok_s"], results["long_output_engine_forced_3.5_tau"] = (
        engine_tokens_per_second(draft, prompt, long_output, num_draft_tokens=5, forced_acceptance=3.5)
    )
    return results


def print_forced_rows(results: dict) -> None:
    print(
        "engine (FORCED acceptance, benchmark only): "
        + ", ".join(
            f"{k}: {results[f'engine_forced_{k}_tok_s']:.1f} (tau {results[f'engine_forced_{k}_tau']:.2f})"
            for k in (1, 2, 3, 3.5, 4, 5)
        )
        + " tok/s"
    )
    print(
        f"forced 3.5, draft over a quarter of the vocabulary: {results['engine_forced_3.5_quarter_vocab_tok_s']:.1f} "
        f"tok/s (tau {results['engine_forced_3.5_quarter_vocab_tau']:.2f}); {results['long_output_new_tokens']} new "
        f"tokens: vanilla static {results['long_output_vanilla_static_tok_s']:.1f}, engine forced 3.5 "
        f"{results['long_output_engine_forced_3.5_tok_s']:.1f} tok/s (tau "
        f"{results['long_output_engine_forced_3.5_tau']:.2f})"
    )


def quick(args, model_fields: dict, contexts: tuple[int, ...], results: dict) -> int:
    """A short check of the steps and forced 3.5 after a change (engine_gpu_quick.json)."""
    target, draft = build(model_fields, torch.float32 if args.tiny else torch.bfloat16)
    prompt = prompt_of(128)
    results["vanilla_dynamic_tok_s"] = vanilla_tokens_per_second(target, prompt, args.new_tokens)
    for context in contexts:
        results[f"steps_{context}"] = step_times(target, draft, context)
    context = contexts[0]
    steps = results[f"steps_{context}"]
    results.update(forced_3_5_rows(draft, prompt, args.new_tokens))
    with open(os.path.join(args.out, "engine_gpu_quick.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    one_token = steps["verify_1_graph_ms"]
    full, quarter = steps["draft_step_graph_ms"], steps["draft_step_quarter_vocab_graph_ms"]
    print(f"\n{results['device']} | torch {results['torch']} | transformers {results['transformers']}")
    print(
        f"ctx {context}, graphs: target 1-token {one_token:.2f} ms (masked), {steps['split_1_graph_ms']:.2f} ms "
        f"(split) | draft {full:.2f} ms ({100 * full / one_token:.1f}%), quarter vocabulary {quarter:.2f} ms "
        f"({100 * quarter / one_token:.1f}%), unfused {steps['draft_step_unfused_graph_ms']:.2f} ms"
    )
    for context in contexts:
        steps = results[f"steps_{context}"]
        base = steps["split_1_graph_ms"]
        print(
            f"ctx {context}, graphs, split: 1-token {base:.2f} ms, verify 8/32/64 nodes "
            + " / ".join(f"{steps[f'split_{n}_graph_ms'] / base:.2f}x" for n in (8, 32, 64))
            + f" (64 nodes {steps['split_64_graph_ms']:.2f} ms; masked 1-token {steps['verify_1_graph_ms']:.2f} ms)"
            + f" | own norms: 1-token {steps['split_1_own_norms_graph_ms']:.2f} ms,"
            + f" 64 nodes {steps['split_64_own_norms_graph_ms']:.2f} ms"
        )
    print(
        f"vanilla dynamic {results['vanilla_dynamic_tok_s']:.1f} tok/s | engine forced 3.5 (benchmark only): "
        f"{results['engine_forced_3.5_tok_s']:.1f} tok/s, quarter vocabulary "
        f"{results['engine_forced_3.5_quarter_vocab_tok_s']:.1f} tok/s"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-long", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="small model, short runs: a smoke test of this script")
    parser.add_argument(
        "--forced-only", action="store_true", help="only the vanilla baselines and the forced-acceptance rows"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only vanilla dynamic generate, the steps at 1k context and forced 3.5 (full and quarter vocabulary)",
    )
    parser.add_argument(
        "--quick-contexts", type=int, nargs="*", default=[], help="with --quick: the steps at these contexts too"
    )
    args = parser.parse_args()
    model_fields = TINY if args.tiny else LLAMA3_8B
    contexts = (64, 256) if args.tiny else (1024, 4096, 16384)
    long_context = 512 if args.tiny else 32768
    import transformers

    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__}
    if args.quick:
        return quick(args, model_fields, (contexts[0], *args.quick_contexts), results)
    if not (args.skip_long or args.forced_only):
        results.update(long_context_exactness(long_context, 32, args.tiny))
    target, draft = build(model_fields, torch.float32 if args.tiny else torch.bfloat16)
    prompt = prompt_of(128)
    results["vanilla_dynamic_tok_s"] = vanilla_tokens_per_second(target, prompt, args.new_tokens)
    results["vanilla_static_tok_s"] = vanilla_tokens_per_second(
        target, prompt, args.new_tokens, cache_implementation="static"
    )
    if args.forced_only:
        results.update(forced_acceptance_rows(target, draft, prompt, args.new_tokens))
        with open(os.path.join(args.out, "engine_gpu_forced.json"), "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"\n{results['device']} | torch {results['torch']} | transformers {results['transformers']}")
        print(
            f"vanilla generate: dynamic {results['vanilla_dynamic_tok_s']:.1f} tok/s, static "
            f"{results['vanilla_static_tok_s']:.1f} tok/s"
        )
        print_forced_rows(results)
        return 0
    for context in contexts:
        results[f"steps_{context}"] = step_times(target, draft, context)
    results["draft_cache_bytes_long"] = step_times(target, draft, long_context)["draft_cache_bytes"]
    results.update(forced_acceptance_rows(target, draft, prompt, args.new_tokens))
    results["engine_forced_3_split_tok_s"] = engine_tokens_per_second(
        draft, prompt, args.new_tokens, num_draft_tokens=5, forced_acceptance=3, verify_attention="split"
    )[0]
    results.update(split_agrees_with_masked(draft, prompt, args.new_tokens))
    long_prompt = prompt_of(256 if args.tiny else 16384)
    results["long_vanilla_dynamic_tok_s"] = vanilla_tokens_per_second(target, long_prompt, 64)
    for attention in ("split", "masked"):
        results[f"long_engine_forced_3_{attention}_tok_s"] = engine_tokens_per_second(
            draft, long_prompt, 64, num_draft_tokens=5, forced_acceptance=3, verify_attention=attention
        )[0]
    results["engine_forced_3_eager_tok_s"] = engine_tokens_per_second(
        draft, prompt, args.new_tokens, num_draft_tokens=5, forced_acceptance=3, use_cuda_graphs=False
    )[0]
    for batch in (1, 4, 16):
        batch_prompt = prompt_of(128, batch)
        results[f"batch_{batch}_vanilla_tok_s"] = vanilla_tokens_per_second(target, batch_prompt, args.new_tokens)
        results[f"batch_{batch}_engine_forced3_tok_s"] = engine_tokens_per_second(
            draft, batch_prompt, args.new_tokens, num_draft_tokens=5, forced_acceptance=3
        )[0]
    with open(os.path.join(args.out, "engine_gpu.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps(results, indent=1))
    one = {c: results[f"steps_{c}"] for c in contexts}
    print(f"\n{results['device']} | torch {results['torch']} | transformers {results['transformers']}")
    print(
        f"vanilla generate: dynamic {results['vanilla_dynamic_tok_s']:.1f} tok/s, "
        f"static {results['vanilla_static_tok_s']:.1f} tok/s"
    )
    for context, steps in one.items():
        for kind in ("", "_graph"):
            draft_ms = steps[f"draft_step{kind}_ms"]
            for attention in ("split", "verify"):
                base = steps[f"{attention}_1{kind}_ms"]
                print(
                    f"ctx {context:>6} {'graphs' if kind else 'eager':>6} "
                    f"{'split' if attention == 'split' else 'masked':>6}: target 1-token {base:.2f} ms | draft "
                    f"{draft_ms:.2f} ms ({100 * draft_ms / base:.1f}%) | verify 8/32/64 nodes "
                    + " / ".join(f"{steps[f'{attention}_{n}{kind}_ms'] / base:.2f}x" for n in (8, 32, 64))
                )
    for context, steps in one.items():
        if "split_flash_1_graph_ms" in steps:
            base = steps["split_flash_1_graph_ms"]
            print(
                f"ctx {context:>6} graphs split, flash prefix + torch merge (previous): target 1-token {base:.2f} ms"
                " | verify 8/32/64 nodes "
                + " / ".join(f"{steps[f'split_flash_{n}_graph_ms'] / base:.2f}x" for n in (8, 32, 64))
            )
    print(
        "draft step without fused projections (graphs): "
        + ", ".join(f"{c}: {s['draft_step_unfused_graph_ms']:.2f} ms" for c, s in one.items())
    )
    print(
        "draft step over a quarter of the vocabulary (graphs): "
        + ", ".join(f"{c}: {s['draft_step_quarter_vocab_graph_ms']:.2f} ms" for c, s in one.items())
    )
    print(
        f"draft cache: {one[contexts[0]]['draft_cache_bytes']} B at {contexts[0]} tokens, "
        f"{results['draft_cache_bytes_long']} B at {long_context}"
    )
    print(
        f"engine forced 3 without CUDA graphs: {results['engine_forced_3_eager_tok_s']:.1f} tok/s; "
        f"with split verification: {results['engine_forced_3_split_tok_s']:.1f} tok/s"
    )
    print(
        f"{long_prompt.shape[1]}-token prompt, 64 new tokens: vanilla dynamic "
        f"{results['long_vanilla_dynamic_tok_s']:.1f} tok/s; engine forced 3, split "
        f"{results['long_engine_forced_3_split_tok_s']:.1f} / masked "
        f"{results['long_engine_forced_3_masked_tok_s']:.1f}"
    )
    print(
        f"bf16 greedy, split vs masked verification: first difference at token "
        f"{results['bf16_split_vs_masked_first_difference']} of {results['bf16_split_vs_masked_tokens']}"
    )
    print_forced_rows(results)
    batches = [
        f"B={b}: {results[f'batch_{b}_vanilla_tok_s']:.0f} / {results[f'batch_{b}_engine_forced3_tok_s']:.0f}"
        for b in (1, 4, 16)
    ]
    print("batch (vanilla / engine forced 3): " + ", ".join(batches))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
