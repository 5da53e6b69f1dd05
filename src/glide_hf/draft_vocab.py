"""The draft's vocabulary: the token ids the engine drafts over, chosen by their frequency in your data.

A draft step multiplies the draft's hidden state by the target's LM head; at Llama-3 shape that head is 128256 x
4096 (1 GB in bf16) and dominates the step's memory traffic. Restricting proposals to the most frequent tokens of
the data you serve (FR-Spec; EAGLE-3's draft vocabulary) reads a fraction of it. Decoding stays lossless: the
target verifies every proposal and produces any token the draft cannot propose.

`glide-hf draft-vocab --draft DIR --data FILES --size N --output DIR` counts the tokens of the data (the tokens
that carry loss: assistant turns of chat data, targets of source/target pairs) with the target's tokenizer and
saves the draft with its vocabulary (`GlideForCausalLM.set_draft_vocabulary`).
"""

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import GlideConfigError
from .modeling_glide import GlideForCausalLM

__all__ = ["count_tokens", "most_frequent_token_ids", "run_cli"]

IGNORE_INDEX = -100


def count_tokens(token_sequences: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in `token_sequences` (`IGNORE_INDEX` entries skipped): `[vocab_size]` int64."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for sequence in token_sequences:
        ids = torch.as_tensor(list(sequence), dtype=torch.long)
        ids = ids[ids != IGNORE_INDEX]
        if ids.numel() == 0:
            continue
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise GlideConfigError(
                f"A token id {int(ids.max())} or {int(ids.min())} lies outside the vocabulary of {vocab_size}: was "
                "the data tokenized with the target's tokenizer?"
            )
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def most_frequent_token_ids(counts: torch.Tensor, size: int, always_include: Iterable[int] = ()) -> torch.Tensor:
    """The `size` token ids with the highest `counts` (ties: the lower id first), `always_include` among them
    (end-of-sequence and other special tokens the data may rarely show). Sorted ascending."""
    vocab_size = counts.numel()
    required = sorted({int(token) for token in always_include})
    if not 1 <= size <= vocab_size:
        raise GlideConfigError(f"The draft vocabulary size must be in 1..{vocab_size}, got {size}.")
    if any(not 0 <= token < vocab_size for token in required):
        raise GlideConfigError(f"`always_include` {required} holds ids outside the vocabulary of {vocab_size}.")
    if len(required) > size:
        raise GlideConfigError(f"`always_include` holds {len(required)} ids, more than the size {size}.")
    order = torch.sort(counts, descending=True, stable=True).indices
    chosen = torch.zeros(vocab_size, dtype=torch.bool)
    chosen[required] = True
    rest = order[~chosen[order]][: size - len(required)]
    chosen[rest] = True
    return chosen.nonzero().squeeze(-1)


def _build_parser(prog: str) -> argparse.ArgumentParser:
    """The flags of `glide-hf draft-vocab`. A flag of two words is spelled `--max-length` or `--max_length`, as in
    the commands whose flags come from dataclasses (`HfArgumentParser`)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Count the tokens of your data with the target's tokenizer and save the draft with its most "
        "frequent --size tokens as the vocabulary the engine drafts over (output stays the target's).",
    )
    parser.add_argument("--draft", required=True, help="Folder (or Hub id) of the glide-hf draft.")
    parser.add_argument("--data", required=True, nargs="+", help="JSONL, JSON or Parquet files, or saved datasets.")
    parser.add_argument("--size", required=True, type=int, help="Number of token ids to draft over, e.g. 32768.")
    parser.add_argument("--output", required=True, help="Folder to save the draft to (may be --draft itself).")
    parser.add_argument("--target", default=None, help="The target (for its tokenizer); default: the draft's.")
    parser.add_argument(
        "--data-format", "--data_format", default="auto", choices=("auto", "text", "chat", "source_target")
    )
    parser.add_argument(
        "--max-length", "--max_length", type=int, default=8192, help="Longer samples are truncated (in tokens)."
    )
    return parser


def run_cli(argv: list[str], prog: str) -> int:
    """`glide-hf draft-vocab` with the flags `argv` (after the subcommand): choose a draft's vocabulary from data
    and save the draft with it. Returns the exit status."""
    from .data import load_records, tokenize_records

    parser = _build_parser(prog)
    args = parser.parse_args(argv)
    if Path(args.output).is_file():
        parser.error(f"--output {args.output} is a file; pass a folder (it is created if missing).")

    # The target's weights go to the meta device: choosing a vocabulary needs its config and tokenizer only.
    target = AutoModelForCausalLM.from_pretrained(args.target, device_map="meta") if args.target else None
    draft = GlideForCausalLM.from_pretrained(args.draft, target_model=target, target_kwargs={"device_map": "meta"})
    tokenizer = AutoTokenizer.from_pretrained(args.target or draft.config.target_name_or_path)
    records, data_format = load_records(args.data, args.data_format)
    rows, _ = tokenize_records(records, tokenizer, data_format, args.max_length)
    counts = count_tokens(tqdm(rows["labels"], desc="counting tokens", unit="sample"), draft.config.vocab_size)
    special = [token for token in tokenizer.all_special_ids if token < draft.config.vocab_size]
    ids = most_frequent_token_ids(counts, args.size, always_include=special)
    draft.set_draft_vocabulary(ids)
    draft.save_pretrained(args.output)
    covered = counts[ids].sum().item() / max(counts.sum().item(), 1)
    print(
        f"Draft vocabulary: {ids.numel()} of {draft.config.vocab_size} token ids, covering {covered:.1%} of the "
        f"{counts.sum().item()} counted tokens; saved the draft to {args.output}"
    )
    return 0
