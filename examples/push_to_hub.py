"""Publish a trained GLIDE draft on the Hub, with a model card that names its target, data and measured speedup.

The folder uploaded is what `save_pretrained` writes: `config.json` (naming the target, its config nested),
`generation_config.json`, `model.safetensors` with the draft's weights only, the modeling code for
`trust_remote_code=True`, and `README.md`, the model card, rewritten here by `glide_hf.model_card.write_model_card`
with `--results` (a benchmark JSON, e.g. from `examples/fast_generate.py --output-json`), `--training` (a JSON of
datasets and settings, e.g. the output of `glide-hf train --dry-run`) and `--license`.

`draft.push_to_hub(repo_id)` uploads the same files in one call, with the card `save_pretrained` writes (target,
settings, usage, but no results or training data); this script writes the folder first so that the card can carry
them, then uploads the folder. The target is never loaded: it is built on the meta device from its config, which is
all a draft needs to be saved.

Nothing leaves the machine without `--repo-id`; `--tiny` never touches the network (a random tiny target and
draft, written to a local folder, and a listing of what would be pushed).

Run:
    python examples/push_to_hub.py --draft runs/glide-qwen2.5-7b-instruct/stage3 \
        --results bench.json --training training.json --license apache-2.0 --repo-id me/glide-qwen2.5-7b-instruct
    python examples/push_to_hub.py --tiny
"""

import argparse
import json
import os
import tempfile

import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoConfig, AutoModelForCausalLM

from glide_hf import GlideConfig, GlideForCausalLM
from glide_hf.model_card import write_model_card

DEFAULT_DRAFT = "runs/glide-qwen2.5-7b-instruct/stage3"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", default=DEFAULT_DRAFT, help="Folder (or Hub id) of a trained GLIDE draft.")
    parser.add_argument("--repo-id", help="Hub repo to create or update; without it nothing is uploaded.")
    parser.add_argument("--output-dir", help="Where to write the folder to upload (default: a temporary folder).")
    parser.add_argument("--results", help="Benchmark JSON for the card's Results section.")
    parser.add_argument("--training", help="JSON of training datasets and settings for the card's Training section.")
    parser.add_argument("--license", help="The card's licence id, e.g. apache-2.0 (usually the target's).")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument("--tiny", action="store_true", help="A random tiny draft; never uploads.")
    return parser.parse_args(argv)


def load_draft_for_saving(draft_path: str) -> GlideForCausalLM:
    """The draft with a weightless target: built from the target's config on the meta device (only the config
    is read), which passes the draft's shape check and is left out of everything the draft saves."""
    config = GlideConfig.from_pretrained(draft_path)
    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.target_name_or_path))
    return GlideForCausalLM.from_pretrained(draft_path, target_model=target)


def tiny_inputs(work_dir: str) -> tuple[str, str, str]:
    """A saved random draft for a saved tiny target, a measured result of it and training notes."""
    from _tiny import TINY_PROMPTS, build_byte_tokenizer, save_tiny_target

    target_path = save_tiny_target(os.path.join(work_dir, "tiny-target"))
    draft = GlideForCausalLM.from_target(target_path, sliding_window=32).eval()
    draft_path = os.path.join(work_dir, "draft")
    draft.save_pretrained(draft_path)
    tokenizer = build_byte_tokenizer()
    inputs = tokenizer(TINY_PROMPTS[:1], return_tensors="pt")  # batch 1: the engine's ratio is then tau
    output = draft.generate(**inputs, max_new_tokens=32, do_sample=False, return_dict_in_generate=True)
    results = os.path.join(work_dir, "bench.json")
    with open(results, "w", encoding="utf-8") as handle:
        json.dump({"device": "cpu", "results": [{
            "dataset": "a tiny prompt", "draft_strategy": "chain", "batch_size": 1,
            "tokens_per_target_forward": output.tokens_per_target_forward,
        }]}, handle)  # fmt: skip
    training = os.path.join(work_dir, "training.json")
    with open(training, "w", encoding="utf-8") as handle:
        json.dump({"data": "none: an untrained random draft (examples/push_to_hub.py --tiny)"}, handle)
    return draft_path, results, training


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as work_dir:
        draft_path, results, training = args.draft, args.results, args.training
        if args.tiny:
            draft_path, results, training = tiny_inputs(work_dir)
        draft = load_draft_for_saving(draft_path)
        folder = args.output_dir or os.path.join(work_dir, "upload")
        draft.save_pretrained(folder)
        repo_id = None if args.tiny else args.repo_id
        write_model_card(
            draft,
            folder,
            tags=draft.model_tags,
            results=results,
            training=training,
            license=args.license,
            repo_id=repo_id,
        )

        print(f"folder to upload: {folder}")
        for name in sorted(os.listdir(folder)):
            print(f"  {name:28s} {os.path.getsize(os.path.join(folder, name)):>12,d} bytes")
        card = ModelCard.load(os.path.join(folder, "README.md"))
        print(f"model card front matter: {card.data.to_dict()}")
        print("--- README.md:\n" + card.text.strip())
        if repo_id is None:
            print("not uploaded" + (" (--tiny)" if args.tiny else " (no --repo-id)"))
            return 0
        api = HfApi()
        repo_id = api.create_repo(repo_id, private=args.private, exist_ok=True).repo_id
        api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload GLIDE draft")
        print(f"uploaded to https://huggingface.co/{repo_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
