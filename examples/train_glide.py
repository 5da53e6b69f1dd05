"""Train a GLIDE draft for a target from Python: `GlideTrainingArguments` + `TrainingArguments` -> `train_glide`.

The settings are those of LongSpec's first stage (short general text, packed rows, Anchor-Offset positions, noisy
lag), as in `examples/configs/*-stage1.yaml`; the later stages continue from this one with `init_draft`. The same
run on the command line is `glide-hf train examples/configs/qwen2.5-7b-instruct-stage1.yaml`.

`train_glide` loads the frozen target, builds a new fp32 draft, tokenizes and packs the data, trains with a stock
`transformers.Trainer`, evaluates `eval_loss` and `eval_tokens_per_target_forward` (greedy assisted decoding of
held-out prompts), and saves the draft (weights without the target, config naming it, model card) to `--output-dir`.

Run:
    python examples/train_glide.py --target Qwen/Qwen2.5-7B-Instruct \
        --data "data/SlimPajama-6B/data/train-*.parquet" --output-dir runs/glide-qwen2.5-7b-instruct/stage1
    accelerate launch examples/train_glide.py ...   # several GPUs (DDP); see docs/training.md
    python examples/train_glide.py --tiny           # a random tiny target on the CPU, a few steps, in seconds
"""

import argparse
import json
import os
import tempfile

import torch
from transformers import TrainingArguments

from glide_hf.trainer import GlideTrainingArguments, train_glide

DEFAULT_TARGET = "Qwen/Qwen2.5-7B-Instruct"
DEFAULT_DATA = "data/SlimPajama-6B/data/train-*.parquet"
DEFAULT_OUTPUT_DIR = "runs/glide-qwen2.5-7b-instruct/stage1"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=DEFAULT_TARGET, help="Hub id or folder of the target model.")
    parser.add_argument("--data", nargs="+", default=[DEFAULT_DATA], help="JSONL/JSON/Parquet files or patterns.")
    parser.add_argument("--output-dir", default=None, help=f"Where the draft goes (default: {DEFAULT_OUTPUT_DIR}).")
    parser.add_argument("--max-steps", type=int, default=-1, help="Stop after this many steps (-1: one epoch).")
    parser.add_argument("--tiny", action="store_true", help="Random tiny target on the CPU, a few steps.")
    return parser.parse_args(argv)


def stage1_arguments(target: str, data: list[str], output_dir: str, max_steps: int):
    """LongSpec's stage 1 for a 7-8B target on 8 GPUs (global batch 8 x 32 x 8 = 2048 rows of 1024 tokens)."""
    glide_args = GlideTrainingArguments(
        target=target,
        data=data,
        data_format="text",
        max_length=1024,
        packing=True,  # documents joined by EOS into full rows
        anchor_offset=True,  # LongSpec's Anchor-Offset positions: 4 anchors, then an offset in [0, 30000]
        num_anchors=4,
        max_position_offset=30000,
        sliding_window=512,
        max_draft_lag=5,  # train every lag the engine's 5 draft steps produce
        eval_split_fraction=0.0005,
    )
    training_args = TrainingArguments(
        output_dir=output_dir,
        bf16=torch.cuda.is_available(),  # fp32 master weights of the draft under bf16 autocast
        per_device_train_batch_size=8,
        gradient_accumulation_steps=32,
        learning_rate=5e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,  # a fraction of the total steps
        weight_decay=0.1,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        max_grad_norm=1.0,
        num_train_epochs=1,
        max_steps=max_steps,
        eval_strategy="steps",
        eval_steps=200,
        save_steps=200,
        save_total_limit=3,
        logging_steps=10,
        seed=42,
        report_to="none",
    )
    return glide_args, training_args


def tiny_arguments(work_dir: str, output_dir: str):
    """The same recipe at toy size: a saved random target (with a byte-level tokenizer), text records, 8 steps."""
    from _tiny import save_tiny_target, tiny_texts, write_jsonl

    target = save_tiny_target(os.path.join(work_dir, "tiny-target"))
    records = [{"text": text} for text in tiny_texts(48, length=100)]
    data = write_jsonl(os.path.join(work_dir, "data", "train.jsonl"), records)
    glide_args = GlideTrainingArguments(
        target=target, data=[data], max_length=128, packing=True, anchor_offset=True, max_position_offset=256,
        sliding_window=32, max_draft_lag=3, num_draft_tokens=3, eval_split_fraction=0.1,
        acceptance_eval_prompts=2, acceptance_eval_max_new_tokens=8, acceptance_eval_prompt_length=32,
        data_cache_dir=os.path.join(work_dir, "datasets-cache"),
    )  # fmt: skip
    training_args = TrainingArguments(
        output_dir=output_dir, max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3,
        lr_scheduler_type="constant", eval_strategy="steps", eval_steps=8, save_strategy="no", logging_steps=4,
        use_cpu=True, disable_tqdm=True, report_to="none", seed=0,
    )  # fmt: skip
    return glide_args, training_args


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as work_dir:
        if args.tiny:
            output_dir = args.output_dir or os.path.join(work_dir, "draft")
            glide_args, training_args = tiny_arguments(work_dir, output_dir)
        else:
            output_dir = args.output_dir or DEFAULT_OUTPUT_DIR
            glide_args, training_args = stage1_arguments(args.target, args.data, output_dir, args.max_steps)
        draft = train_glide(glide_args, training_args)
        with open(os.path.join(output_dir, "all_results.json"), encoding="utf-8") as handle:
            metrics = json.load(handle)
        draft_parameters = sum(parameter.numel() for parameter in draft.model.layer.parameters())
        print(
            f"saved the draft ({draft_parameters / 1e6:.2f}M parameters in its layer) to {output_dir}: "
            f"{sorted(os.listdir(output_dir))}"
        )
        print("final metrics: " + ", ".join(f"{key} {value:.4g}" for key, value in sorted(metrics.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
