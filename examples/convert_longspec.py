"""Bring a LongSpec draft over: convert a `sail/longspec-*` checkpoint (or LongSpec's training output
`draft_model_weights.pth`) into a glide-hf draft folder, then load and use it like any other.

The conversion maps LongSpec's unprefixed tensors (`self_attn.q_proj.weight`, ...) into the draft layer, drops the
cross-attention k/v projections LongSpec stores but never uses, and sets `final_norm=False`,
`attention_bias=True` and `sliding_window=513` (LongSpec's flash-attention window of 512 previous tokens plus the
token itself). The target's weights are not needed, only its config: it is loaded on the meta device.
The same conversion on the command line:

    glide-hf convert-longspec --checkpoint sail/longspec-QwQ-32B-Preview --target Qwen/QwQ-32B-Preview \
        --output runs/glide-qwq-32b-preview

Run:
    python examples/convert_longspec.py --checkpoint sail/longspec-QwQ-32B-Preview --target Qwen/QwQ-32B-Preview \
        --output runs/glide-qwq-32b-preview
    python examples/convert_longspec.py --tiny   # writes a LongSpec checkpoint of random tensors, converts it
"""

import argparse
import os
import tempfile

import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from glide_hf import GlideForCausalLM
from glide_hf.convert import convert_longspec

DEFAULT_CHECKPOINT = "sail/longspec-QwQ-32B-Preview"
DEFAULT_TARGET = "Qwen/QwQ-32B-Preview"
DEFAULT_OUTPUT = "runs/glide-qwq-32b-preview"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="LongSpec folder, file or Hub repo id.")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="Hub id or folder of the draft's target.")
    parser.add_argument("--output", default=None, help=f"Folder for the glide-hf draft (default: {DEFAULT_OUTPUT}).")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="Default: the checkpoint's.")
    parser.add_argument("--tiny", action="store_true", help="A random LongSpec checkpoint for a tiny Qwen2 target.")
    return parser.parse_args(argv)


def write_tiny_longspec_checkpoint(folder: str, target_config) -> str:
    """A LongSpec draft in its Hub format: the target's config.json and one model.safetensors of random tensors,
    named and shaped as LongSpec's draft layer (q/k/v biases in both attentions, unused cross-attention k/v, no
    final norm; `head_dim = hidden_size // num_attention_heads`)."""
    hidden, intermediate = target_config.hidden_size, target_config.intermediate_size
    head_dim = hidden // target_config.num_attention_heads
    q_out, kv_out = target_config.num_attention_heads * head_dim, target_config.num_key_value_heads * head_dim
    shapes = {}
    for attention in ("self_attn", "cross_attn"):
        for projection, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            shapes[f"{attention}.{projection}.weight"] = (out, hidden)
            shapes[f"{attention}.{projection}.bias"] = (out,)
        shapes[f"{attention}.o_proj.weight"] = (hidden, q_out)
    shapes |= {
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
        "input_layernorm.weight": (hidden,),
        "post_self_attention_layernorm.weight": (hidden,),
        "post_cross_attention_layernorm.weight": (hidden,),
    }
    generator = torch.Generator().manual_seed(0)
    tensors = {
        name: (1.0 if "layernorm" in name else 0.0) + 0.1 * torch.randn(shape, generator=generator)
        for name, shape in shapes.items()
    }
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    target_config.to_json_file(os.path.join(folder, "config.json"))
    return folder


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as work_dir:
        checkpoint, target, output = args.checkpoint, args.target, args.output or DEFAULT_OUTPUT
        if args.tiny:
            from _tiny import save_tiny_target

            target = save_tiny_target(os.path.join(work_dir, "tiny-qwen2-target"), family="qwen2")
            target_config = AutoConfig.from_pretrained(target)
            checkpoint = write_tiny_longspec_checkpoint(os.path.join(work_dir, "longspec-tiny"), target_config)
            output = args.output or os.path.join(work_dir, "glide-tiny")

        # Only the target's config and module layout matter here: its weights stay on the meta device.
        draft = convert_longspec(
            checkpoint, target, output_dir=output, target_kwargs={"device_map": "meta"}, dtype=args.dtype
        )
        config = draft.config
        print(
            f"converted {checkpoint} -> {output}: sliding_window={config.sliding_window}, "
            f"final_norm={config.final_norm}, attention_bias={config.attention_bias}, dtype={config.dtype}"
        )
        print(f"files: {sorted(os.listdir(output))}")
        if not args.tiny:
            print(
                f"load it with GlideForCausalLM.from_pretrained({output!r}) (the target named in its config loads "
                "too), then decode with target.generate(..., assistant_model=draft) or draft.generate(...)"
            )
            return 0

        # A converted draft is an ordinary glide-hf draft: load it with its (tiny) target and decode exactly.
        draft = GlideForCausalLM.from_pretrained(output).eval()
        prompt = torch.tensor([[5, 17, 42, 99, 7, 3, 64, 12]])
        expected = draft.target.generate(prompt, max_new_tokens=24, do_sample=False)
        output_ids = draft.generate(prompt, max_new_tokens=24, do_sample=False)
        identical = torch.equal(output_ids, expected)
        print(f"loaded the converted draft; greedy draft.generate output identical to the target's: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
