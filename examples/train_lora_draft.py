"""LoRA on a GLIDE draft: a cheap per-domain variant of a trained draft, with PEFT and a stock `Trainer`.

1. Load the base draft onto its target. A base draft must exist on disk before it is wrapped: `get_peft_model`
   replaces the draft's linear layers in place, and an adapter only means something on top of the exact base weights
   it was trained on (a new draft from `from_target` is random: save it first, as `--tiny` does).
2. Wrap it with `glide_hf.lora.glide_lora_config`, whose `target_modules` pattern matches the draft layer's linears
   only: the frozen target (a submodule of the draft) never gets adapters.
3. Train on chat data (loss on the assistant turns) with `glide_hf.data.prepare_data` and `GlideDataCollator`.
4. Save the adapter alone (a few MB), reload it on the base draft, merge it, and decode with the merged draft.

Run:
    python examples/train_lora_draft.py --target Qwen/Qwen2.5-7B-Instruct \
        --draft runs/glide-qwen2.5-7b-instruct/stage3 --data my-domain-chats.jsonl \
        --output-dir runs/glide-qwen2.5-7b-instruct/lora-my-domain
    python examples/train_lora_draft.py --tiny   # a random tiny target and base draft on the CPU, in seconds
"""

import argparse
import os
import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from glide_hf import GlideForCausalLM
from glide_hf.data import GlideDataCollator, prepare_data
from glide_hf.lora import DRAFT_LORA_MODULES, glide_lora_config

DEFAULT_TARGET = "Qwen/Qwen2.5-7B-Instruct"
DEFAULT_DRAFT = "runs/glide-qwen2.5-7b-instruct/stage3"
DEFAULT_OUTPUT_DIR = "runs/glide-qwen2.5-7b-instruct/lora"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=DEFAULT_TARGET, help="Hub id or folder of the target model.")
    parser.add_argument("--draft", default=DEFAULT_DRAFT, help="Hub id or folder of the base GLIDE draft.")
    parser.add_argument("--data", nargs="+", default=["my-domain-chats.jsonl"], help="Chat JSONL ({'messages'}).")
    parser.add_argument("--output-dir", default=None, help=f"Adapter and logs (default: {DEFAULT_OUTPUT_DIR}).")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank.")
    parser.add_argument(
        "--modules",
        nargs="+",
        choices=sorted(DRAFT_LORA_MODULES),
        default=sorted(DRAFT_LORA_MODULES),
        help="Groups of the draft layer to adapt.",
    )
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--max-steps", type=int, default=-1, help="Stop after this many steps (-1: one epoch).")
    parser.add_argument("--tiny", action="store_true", help="Random tiny target and base draft on the CPU.")
    return parser.parse_args(argv)


def tiny_setup(work_dir: str):
    """A saved tiny target, a new base draft saved before wrapping, and chat records built from text."""
    from _tiny import save_tiny_target, tiny_texts, write_jsonl

    target_path = save_tiny_target(os.path.join(work_dir, "tiny-target"))
    target = AutoModelForCausalLM.from_pretrained(target_path)
    torch.manual_seed(0)
    draft = GlideForCausalLM.from_target(target, sliding_window=32)
    base_dir = os.path.join(work_dir, "base-draft")
    draft.save_pretrained(base_dir)  # the base the adapter belongs to: saved before `get_peft_model` wraps it
    chats = [
        {"messages": [{"role": "user", "content": text[:40]}, {"role": "assistant", "content": text[40:]}]}
        for text in tiny_texts(32, length=100)
    ]
    data = write_jsonl(os.path.join(work_dir, "data", "chats.jsonl"), chats)
    return target, AutoTokenizer.from_pretrained(target_path), draft, base_dir, [data]


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as work_dir:
        if args.tiny:
            target, tokenizer, draft, base_dir, data_files = tiny_setup(work_dir)
            output_dir, max_length, cache_dir = args.output_dir or os.path.join(work_dir, "lora"), 128, work_dir
        else:
            dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
            target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(args.target)
            draft = GlideForCausalLM.from_pretrained(args.draft, target_model=target)  # fp32 draft weights
            base_dir, data_files = args.draft, args.data
            output_dir, max_length, cache_dir = args.output_dir or DEFAULT_OUTPUT_DIR, args.max_length, None

        lora_config = glide_lora_config(r=args.rank, lora_alpha=2 * args.rank, modules=args.modules)
        peft_draft = get_peft_model(draft, lora_config)
        peft_draft.print_trainable_parameters()  # the adapters of the draft layer only

        data = prepare_data(data_files, tokenizer, data_format="chat", max_length=max_length, cache_dir=cache_dir)
        collator = GlideDataCollator(pad_token_id=tokenizer.pad_token_id)
        training_args = TrainingArguments(
            output_dir=output_dir,
            max_steps=8 if args.tiny else args.max_steps,
            per_device_train_batch_size=4,
            learning_rate=1e-3 if args.tiny else 2e-4,
            lr_scheduler_type="cosine",
            logging_steps=4 if args.tiny else 10,
            save_strategy="no" if args.tiny else "steps",
            bf16=torch.cuda.is_available(),
            use_cpu=args.tiny,
            disable_tqdm=args.tiny,
            report_to="none",
        )
        Trainer(model=peft_draft, args=training_args, train_dataset=data.train_dataset, data_collator=collator).train()

        adapter_dir = os.path.join(output_dir, "adapter")
        peft_draft.save_pretrained(adapter_dir)  # adapter_config.json + adapter_model.safetensors: no base, no target
        print(f"saved the adapter to {adapter_dir}: {sorted(os.listdir(adapter_dir))}")

        # Reload the adapter on the saved base draft, merge it, and decode with the GLIDE engine.
        base = GlideForCausalLM.from_pretrained(base_dir, target_model=target)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()
        if not args.tiny:
            merged.save_pretrained(os.path.join(output_dir, "merged"))  # a plain glide-hf draft, for push_to_hub
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "def main():"}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        ).to(target.device)
        merged.to(target.device)
        expected = target.generate(**prompt, max_new_tokens=32, do_sample=False)
        output = merged.generate(**prompt, max_new_tokens=32, do_sample=False, return_dict_in_generate=True)
        identical = torch.equal(output.sequences, expected)
        print(
            f"merged draft: {output.tokens_per_target_forward:.2f} tokens per target forward, greedy output "
            f"identical to the target's: {identical}"
        )
    return 0 if identical or not args.tiny else 1


if __name__ == "__main__":
    raise SystemExit(main())
