"""LongSpec checkpoint conversion (issue 6, item 4): `glide_hf.convert` and `glide-hf convert-longspec`.

Checkpoints are written here in LongSpec's two formats, with random tensors of the right shapes (biases and the
unused cross-attention k/v included): the Hub format (a folder with the target's `config.json` and `model.safetensors`)
and the training code's (`draft_model_weights.pth`, a `torch.save`d state dict, no config). The converted draft is
compared with `longspec_reference_logits`, LongSpec's draft forward written from its description in plain torch
(no glide_hf code), so a wrong mapping, window, lag or missing norm shows up as different logits.
"""

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from glide_hf import (
    CheckpointFormatError,
    GlideConfigError,
    GlideForCausalLM,
    TargetMismatchError,
    TargetNotFoundError,
)
from glide_hf.cli import main as cli_main
from glide_hf.convert import LONGSPEC_SLIDING_WINDOW, convert_longspec, read_longspec_checkpoint

FAMILIES = ("llama", "qwen2")
# LongSpec's flash-attention `window_size=(512, -1)`: each query sees this many previous tokens, plus itself.
LONGSPEC_PREVIOUS_TOKENS = 512
UNUSED_TENSORS = (
    "cross_attn.k_proj.weight",
    "cross_attn.k_proj.bias",
    "cross_attn.v_proj.weight",
    "cross_attn.v_proj.bias",
)
# fp32 reference and draft differ in summation order only (sdpa vs matmul + softmax, fused vs separate RMSNorm).
ATOL = 1e-5


def longspec_shapes(target_config) -> dict[str, tuple[int, ...]]:
    """The tensors of a LongSpec draft layer for a target, by LongSpec's own rules (notes 1.1): every shape from the
    target's config, `head_dim = hidden_size // num_attention_heads`, biases on every q/k/v projection."""
    hidden, intermediate = target_config.hidden_size, target_config.intermediate_size
    q_out = target_config.num_attention_heads * (hidden // target_config.num_attention_heads)
    kv_out = target_config.num_key_value_heads * (hidden // target_config.num_attention_heads)
    shapes = {}
    for attention in ("self_attn", "cross_attn"):
        shapes |= {
            f"{attention}.q_proj.weight": (q_out, hidden),
            f"{attention}.q_proj.bias": (q_out,),
            f"{attention}.k_proj.weight": (kv_out, hidden),
            f"{attention}.k_proj.bias": (kv_out,),
            f"{attention}.v_proj.weight": (kv_out, hidden),
            f"{attention}.v_proj.bias": (kv_out,),
            f"{attention}.o_proj.weight": (hidden, q_out),
        }
    shapes |= {
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
        "input_layernorm.weight": (hidden,),
        "post_self_attention_layernorm.weight": (hidden,),
        "post_cross_attention_layernorm.weight": (hidden,),
    }
    return shapes


def random_longspec_weights(target_config, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Random LongSpec weights, scaled so that every term of the layer moves the logits."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in longspec_shapes(target_config).items():
        noise = torch.randn(shape, generator=generator)
        weights[name] = (1 + 0.1 * noise if "layernorm" in name else 0.1 * noise).to(dtype)
    return weights


def write_checkpoint(folder: Path, weights: dict, target_config, layout: str = "safetensors_folder") -> Path:
    """Write `weights` in one LongSpec layout under `folder`; returns what to pass as `checkpoint`."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout in ("safetensors_folder", "safetensors_file"):
        # The Hub format: LongSpec saves its draft layer with a plain Llama/Qwen2 config of the target's dims.
        save_file(weights, folder / "model.safetensors")
        target_config.to_json_file(folder / "config.json")
        return folder if layout == "safetensors_folder" else folder / "model.safetensors"
    if layout in ("pth_file", "pth_folder"):
        torch.save(weights, folder / "draft_model_weights.pth")
        return folder if layout == "pth_folder" else folder / "draft_model_weights.pth"
    if layout == "bin_file":
        torch.save(weights, folder / "pytorch_model.bin")
        return folder / "pytorch_model.bin"
    raise ValueError(layout)


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 300) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- LongSpec's draft forward, independent of glide_hf -----------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on `[B, heads, S, D]` with the target's `cos`/`sin` `[B, S, D]` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated_half * sin[:, None]


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax attention of `[B, heads, Q, D]` queries onto `[B, kv_heads, K, D]` keys; query head h reads kv head
    h // (heads / kv_heads), as flash-attention does. A query with no visible key gets a zero output, as LongSpec's
    zero padding of its first `lag` cross-attention rows."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    probabilities = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.nan_to_num(probabilities, nan=0.0) @ value


def longspec_reference_logits(
    weights: dict, target, input_ids: torch.Tensor, lag: int, previous_tokens: int = LONGSPEC_PREVIOUS_TOKENS
) -> torch.Tensor:
    """LongSpec's draft on `input_ids` (notes 1.1, 1.3-1.5, 1.7): the target's embedding; self-attention over the
    `previous_tokens` previous tokens and itself; cross-attention of the query rotated at its own position onto the
    target's last-layer cached keys/values of tokens <= t - lag; SwiGLU MLP; no final norm; the target's LM head."""
    config = target.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    eps = config.rms_norm_eps
    w = {name: tensor.float() for name, tensor in weights.items()}
    batch, length = input_ids.shape
    token = torch.arange(length)

    def split_heads(x, n):  # [B, S, n * D] -> [B, n, S, D]
        return x.view(batch, length, n, head_dim).transpose(1, 2)

    def merge_heads(x):  # [B, n, S, D] -> [B, S, n * D]
        return x.transpose(1, 2).reshape(batch, length, -1)

    def project(x, name):
        return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))

    with torch.no_grad():
        cache = target(input_ids, use_cache=True).cache
        target_keys, target_values = cache.layers[-1].keys, cache.layers[-1].values  # rotated, [B, kv, S, D]
        x = target.get_input_embeddings()(input_ids)
        cos, sin = target.model.rotary_emb(x, token[None].expand(batch, -1))

        h = rms_norm(x, w["input_layernorm.weight"], eps)
        query = rotate(split_heads(project(h, "self_attn.q_proj"), heads), cos, sin)
        key = rotate(split_heads(project(h, "self_attn.k_proj"), kv_heads), cos, sin)
        value = split_heads(project(h, "self_attn.v_proj"), kv_heads)
        distance = token[:, None] - token[None, :]  # [Q, K]: query token minus key token
        in_window = (distance >= 0) & (distance <= previous_tokens)
        x = x + project(merge_heads(attend(query, key, value, in_window)), "self_attn.o_proj")

        h = rms_norm(x, w["post_self_attention_layernorm.weight"], eps)
        query = rotate(split_heads(project(h, "cross_attn.q_proj"), heads), cos, sin)
        x = x + project(merge_heads(attend(query, target_keys, target_values, distance >= lag)), "cross_attn.o_proj")

        h = rms_norm(x, w["post_cross_attention_layernorm.weight"], eps)
        x = x + project(F.silu(project(h, "mlp.gate_proj")) * project(h, "mlp.up_proj"), "mlp.down_proj")
        return target.get_output_embeddings()(x)


def draft_logits(draft: GlideForCausalLM, input_ids: torch.Tensor, lag: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return draft(input_ids=input_ids, draft_lag=lag).logits


# --- the converted draft computes LongSpec's forward -------------------------------------------------------------


@pytest.mark.parametrize("layout", ["safetensors_folder", "pth_file"])
@pytest.mark.parametrize("lag", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_draft_logits_equal_longspec_reference(family, lag, layout, make_target, tmp_path):
    target = make_target(family)
    weights = random_longspec_weights(target.config)
    draft = convert_longspec(write_checkpoint(tmp_path / "longspec", weights, target.config, layout), target)
    input_ids = random_ids(2, 12)
    expected = longspec_reference_logits(weights, target, input_ids, lag=lag)
    torch.testing.assert_close(draft_logits(draft, input_ids, lag), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("previous_tokens", [2, 5])
@pytest.mark.parametrize("family", FAMILIES)
def test_sliding_window_counts_the_token_itself_like_longspec(family, previous_tokens, make_target, tmp_path):
    """`sliding_window=W` sees W - 1 previous tokens plus itself: LongSpec's `window_size=(512, -1)` is W = 513.
    Checked on sequences three times longer than the window."""
    target = make_target(family)
    weights = random_longspec_weights(target.config, seed=1)
    checkpoint = write_checkpoint(tmp_path / "longspec", weights, target.config)
    draft = convert_longspec(checkpoint, target, sliding_window=previous_tokens + 1)
    input_ids = random_ids(2, 18, seed=1)
    for lag in (1, 3):
        expected = longspec_reference_logits(weights, target, input_ids, lag=lag, previous_tokens=previous_tokens)
        torch.testing.assert_close(draft_logits(draft, input_ids, lag), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_drafting_steps_equal_longspec_reference(family, make_target, tmp_path):
    """Token by token with the draft's own cache and the target's cache of the tokens before (the drafting path, gap
    1), on a sequence longer than the window: the cached window keeps the same tokens as the reference's."""
    target = make_target(family)
    weights = random_longspec_weights(target.config, seed=2)
    draft = convert_longspec(write_checkpoint(tmp_path / "longspec", weights, target.config), target, sliding_window=4)
    input_ids = random_ids(1, 14, seed=2)
    expected = longspec_reference_logits(weights, target, input_ids, lag=1, previous_tokens=3)
    draft_cache, steps = DynamicCache(config=draft.config), []
    with torch.no_grad():
        for position in range(input_ids.shape[1]):
            target_cache = DynamicCache(config=target.config)
            if position > 0:
                target(input_ids[:, :position], cache=target_cache, use_cache=True)
            output = draft(
                input_ids=input_ids[:, position : position + 1],
                position_ids=torch.tensor([[position]]),
                cache=draft_cache,
                use_cache=True,
                target_cache=target_cache,
            )
            draft_cache = output.cache
            steps.append(output.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=ATOL, rtol=0)


def test_converted_draft_uses_longspec_settings(make_target, tmp_path):
    target = make_target("llama")
    weights = random_longspec_weights(target.config)
    draft = convert_longspec(write_checkpoint(tmp_path / "longspec", weights, target.config), target)
    assert LONGSPEC_SLIDING_WINDOW == LONGSPEC_PREVIOUS_TOKENS + 1
    assert draft.config.sliding_window == LONGSPEC_SLIDING_WINDOW
    assert draft.config.final_norm is False and draft.model.norm is None
    assert draft.config.attention_bias is True
    assert draft.config.target_kv_layer_index == target.config.num_hidden_layers - 1
    assert not draft.training


def test_reference_is_sensitive_to_lag_window_and_every_tensor(make_target):
    """Guards the comparison tests: the reference logits move with the lag, the window and each kept tensor."""
    target = make_target("llama")
    weights = random_longspec_weights(target.config)
    input_ids = random_ids(1, 12)
    base = longspec_reference_logits(weights, target, input_ids, lag=1)
    assert (base - longspec_reference_logits(weights, target, input_ids, lag=3)).abs().max() > 1e-3
    assert (base - longspec_reference_logits(weights, target, input_ids, lag=1, previous_tokens=2)).abs().max() > 1e-3
    for name in set(weights) - set(UNUSED_TENSORS):
        changed = dict(weights, **{name: weights[name] * 1.5})
        assert (base - longspec_reference_logits(changed, target, input_ids, lag=1)).abs().max() > 1e-4, name


@pytest.mark.parametrize("layout", ["safetensors_folder", "safetensors_file", "pth_file", "pth_folder", "bin_file"])
def test_every_layout_loads_the_checkpoint_tensors_unchanged(layout, make_target, tmp_path):
    target = make_target("qwen2")
    weights = random_longspec_weights(target.config)
    draft = convert_longspec(write_checkpoint(tmp_path / "longspec", weights, target.config, layout), target)
    state = draft.state_dict()
    for name, tensor in weights.items():
        if name in UNUSED_TENSORS:
            assert f"model.layer.{name}" not in state
        else:
            assert torch.equal(state[f"model.layer.{name}"], tensor), name


def test_unused_cross_attention_key_value_tensors_are_dropped_with_an_info_log(make_target, tmp_path, caplog):
    target = make_target("llama")
    weights = random_longspec_weights(target.config)
    with caplog.at_level(logging.INFO, logger="glide_hf.convert"):
        draft = convert_longspec(write_checkpoint(tmp_path / "longspec", weights, target.config), target)
    assert "cross_attn.k_proj" not in str(draft.state_dict().keys())
    dropped = [record.getMessage() for record in caplog.records if "never uses" in record.getMessage()]
    assert len(dropped) == 1 and all(name in dropped[0] for name in UNUSED_TENSORS)


def test_checkpoint_without_the_unused_tensors_converts(make_target, tmp_path):
    target = make_target("llama")
    weights = {k: v for k, v in random_longspec_weights(target.config).items() if k not in UNUSED_TENSORS}
    draft = convert_longspec(write_checkpoint(tmp_path / "longspec", weights, target.config), target)
    input_ids = random_ids(1, 8)
    expected = longspec_reference_logits(weights, target, input_ids, lag=1)
    torch.testing.assert_close(draft_logits(draft, input_ids), expected, atol=ATOL, rtol=0)


# --- dtypes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["safetensors_folder", "pth_file"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_checkpoint_dtype_is_kept(dtype, layout, make_target, tmp_path):
    target = make_target("llama")
    weights = random_longspec_weights(target.config, dtype=dtype)
    draft = convert_longspec(write_checkpoint(tmp_path / "longspec", weights, target.config, layout), target)
    layer = draft.model.layer
    assert {parameter.dtype for parameter in layer.parameters()} == {dtype}
    assert torch.equal(layer.mlp.up_proj.weight, weights["mlp.up_proj.weight"])
    assert draft.config.dtype == dtype
    assert draft_logits(draft, random_ids(1, 6)).isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, "float32"])
def test_dtype_argument_casts_a_half_precision_checkpoint(dtype, make_target, tmp_path):
    target = make_target("llama")
    weights = random_longspec_weights(target.config, dtype=torch.bfloat16)
    checkpoint = write_checkpoint(tmp_path / "longspec", weights, target.config)
    draft = convert_longspec(checkpoint, target, dtype=dtype)
    assert {parameter.dtype for parameter in draft.model.layer.parameters()} == {torch.float32}
    assert torch.equal(draft.model.layer.self_attn.q_proj.bias, weights["self_attn.q_proj.bias"].float())
    input_ids = random_ids(1, 8)
    expected = longspec_reference_logits(weights, target, input_ids, lag=2)
    torch.testing.assert_close(draft_logits(draft, input_ids, lag=2), expected, atol=ATOL, rtol=0)


def test_mixed_dtypes_need_an_explicit_dtype(make_target, tmp_path):
    target = make_target("llama")
    weights = random_longspec_weights(target.config)
    weights["mlp.down_proj.weight"] = weights["mlp.down_proj.weight"].half()
    checkpoint = write_checkpoint(tmp_path / "longspec", weights, target.config)
    with pytest.raises(CheckpointFormatError, match=r"mixes dtypes \(torch.float16, torch.float32\).*`dtype=`"):
        convert_longspec(checkpoint, target)
    draft = convert_longspec(checkpoint, target, dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in draft.model.layer.parameters()} == {torch.bfloat16}


def test_integer_tensors_are_rejected_even_with_a_dtype(make_target, tmp_path):
    target = make_target("llama")
    weights = random_longspec_weights(target.config)
    weights["input_layernorm.weight"] = torch.ones(target.config.hidden_size, dtype=torch.int64)
    checkpoint = write_checkpoint(tmp_path / "longspec", weights, target.config)
    listed = r"non-floating-point tensors: input_layernorm\.weight \(torch.int64\)"
    with pytest.raises(CheckpointFormatError, match=listed):
        convert_longspec(checkpoint, target, dtype=torch.float32)


def test_unknown_dtype_name_is_rejected(make_target, tmp_path):
    target = make_target("llama")
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    with pytest.raises(ValueError, match="`dtype` must be one of float32, bfloat16, float16"):
        convert_longspec(checkpoint, target, dtype="float8")


# --- bad checkpoints ---------------------------------------------------------------------------------------------


def test_missing_tensors_are_listed(make_target, tmp_path):
    target = make_target("llama")
    weights = random_longspec_weights(target.config)
    del weights["mlp.up_proj.weight"], weights["cross_attn.q_proj.bias"]
    checkpoint = write_checkpoint(tmp_path / "longspec", weights, target.config, "pth_file")
    listed = r"lacks 2 tensors of the draft layer: cross_attn\.q_proj\.bias, mlp\.up_proj\.weight\."
    with pytest.raises(CheckpointFormatError, match=listed):
        convert_longspec(checkpoint, target)


def test_unknown_tensors_are_listed(make_target, tmp_path):
    target = make_target("llama")
    weights = random_longspec_weights(target.config)
    weights["norm.weight"] = torch.ones(target.config.hidden_size)
    weights["lm_head.weight"] = torch.zeros(3, target.config.hidden_size)
    checkpoint = write_checkpoint(tmp_path / "longspec", weights, target.config)
    listed = r"holds 2 tensors a LongSpec draft layer does not have: lm_head\.weight, norm\.weight\."
    with pytest.raises(CheckpointFormatError, match=listed):
        convert_longspec(checkpoint, target)


def test_prefixed_tensor_names_get_a_hint_to_strip_the_prefix(make_target, tmp_path):
    target = make_target("llama")
    weights = {f"draft_model.{k}": v for k, v in random_longspec_weights(target.config).items()}
    checkpoint = write_checkpoint(tmp_path / "longspec", weights, target.config, "pth_file")
    with pytest.raises(CheckpointFormatError, match=r"lacks 16 tensors.*carry the prefix `draft_model\.`"):
        convert_longspec(checkpoint, target)


def test_tensor_shapes_that_do_not_fit_the_target_name_tensor_and_both_shapes(make_target, tmp_path):
    target = make_target("llama")
    other_target = make_target("llama", num_key_value_heads=4)  # same hidden size, twice the KV heads
    weights = random_longspec_weights(other_target.config)
    checkpoint = write_checkpoint(tmp_path / "longspec", weights, other_target.config, "pth_file")  # no config
    with pytest.raises(
        TargetMismatchError, match=r"`self_attn\.k_proj\.weight`: expected \[32, 64\], found \[64, 64\]"
    ):
        convert_longspec(checkpoint, target)


def test_mlp_of_another_width_is_a_shape_mismatch(make_target, tmp_path):
    target = make_target("qwen2")
    weights = random_longspec_weights(target.config)
    weights["mlp.gate_proj.weight"] = torch.zeros(96, target.config.hidden_size)
    checkpoint = write_checkpoint(tmp_path / "longspec", weights, target.config, "pth_file")
    with pytest.raises(TargetMismatchError, match=r"`mlp\.gate_proj\.weight`: expected \[128, 64\], found \[96, 64\]"):
        convert_longspec(checkpoint, target)


@pytest.mark.parametrize(
    ("field", "value"), [("hidden_size", 128), ("num_attention_heads", 8), ("num_key_value_heads", 4)]
)
def test_checkpoint_config_that_disagrees_with_the_target_is_rejected(field, value, make_target, tmp_path):
    target = make_target("llama")
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    config = json.loads((checkpoint / "config.json").read_text())
    config[field] = value
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(TargetMismatchError, match=rf"config has `{field}={value}`.*target .* has `{field}="):
        convert_longspec(checkpoint, target)


def test_checkpoint_config_without_shape_keys_is_rejected(make_target, tmp_path):
    target = make_target("llama")
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointFormatError, match=r"no integer `hidden_size`, `num_attention_heads`"):
        convert_longspec(checkpoint, target)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_attention_heads", 0),
        ("num_attention_heads", -4),
        ("num_attention_heads", 4.5),
        ("num_attention_heads", True),
        ("hidden_size", "64"),
        ("num_key_value_heads", 0),
        ("num_key_value_heads", -2),
        ("num_key_value_heads", "2"),
        ("head_dim", 0),
        ("head_dim", 16.0),
        ("intermediate_size", -128),
        ("rms_norm_eps", 0),
        ("rms_norm_eps", "1e-6"),
    ],
)
def test_checkpoint_config_field_of_invalid_value_is_named(field, value, make_target, tmp_path):
    # Regression: `num_attention_heads: 0` ended in a ZeroDivisionError, `num_key_value_heads: 0` was silently read
    # as `num_attention_heads`, and other values in a TargetMismatchError or a GlideConfigError without the file.
    target = make_target("llama")
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    config = json.loads((checkpoint / "config.json").read_text())
    config[field] = value
    (checkpoint / "config.json").write_text(json.dumps(config))
    expected = "positive number" if field == "rms_norm_eps" else "positive integer"
    with pytest.raises(
        CheckpointFormatError,
        match=rf"`config\.json` beside `.*` has `{field}={re.escape(repr(value))}`: expected a {expected}",
    ):
        convert_longspec(checkpoint, target)


def test_checkpoint_config_with_zero_heads_and_no_head_dim_is_named(make_target, tmp_path):
    # Regression: `head_dim` was derived as `hidden_size // num_attention_heads`, a ZeroDivisionError.
    target = make_target("llama")
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("head_dim", None)
    config["num_attention_heads"] = 0
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match=r"has `num_attention_heads=0`: expected a positive integer"):
        convert_longspec(checkpoint, target)


def test_checkpoint_config_with_null_head_dim_derives_it(make_target, tmp_path):
    target = make_target("llama")
    weights = random_longspec_weights(target.config)
    checkpoint = write_checkpoint(tmp_path / "longspec", weights, target.config)
    config = json.loads((checkpoint / "config.json").read_text())
    config["head_dim"] = None
    (checkpoint / "config.json").write_text(json.dumps(config))
    draft = convert_longspec(checkpoint, target)
    assert torch.equal(draft.model.layer.self_attn.q_proj.weight, weights["self_attn.q_proj.weight"])


def test_a_glide_draft_folder_points_to_from_pretrained(make_target, make_draft, tmp_path):
    target = make_target("llama")
    make_draft(target).save_pretrained(tmp_path / "glide")
    with pytest.raises(CheckpointFormatError, match=r"already a glide-hf draft.*from_pretrained"):
        convert_longspec(tmp_path / "glide", target)


def test_file_of_unknown_format_is_rejected(make_target, tmp_path):
    (tmp_path / "weights.txt").write_text("not weights")
    with pytest.raises(CheckpointFormatError, match=r"not a LongSpec checkpoint format.*found a `\.txt` file"):
        convert_longspec(tmp_path / "weights.txt", make_target("llama"))


def test_folder_without_weights_is_rejected(make_target, tmp_path):
    (tmp_path / "longspec").mkdir()
    (tmp_path / "longspec" / "README.md").write_text("license: mit")
    with pytest.raises(CheckpointFormatError, match=r"holds no LongSpec weights.*found README\.md"):
        convert_longspec(tmp_path / "longspec", make_target("llama"))


def test_folder_with_several_unnamed_weight_files_is_rejected(make_target, tmp_path):
    target = make_target("llama")
    weights = random_longspec_weights(target.config)
    (tmp_path / "longspec").mkdir()
    torch.save(weights, tmp_path / "longspec" / "step-100.pth")
    torch.save(weights, tmp_path / "longspec" / "step-200.pth")
    with pytest.raises(CheckpointFormatError, match=r"several weight files \(step-100\.pth, step-200\.pth\)"):
        convert_longspec(tmp_path / "longspec", target)


def test_missing_local_path_is_rejected(make_target, tmp_path):
    with pytest.raises(CheckpointFormatError, match=r"the path does not exist"):
        convert_longspec(tmp_path / "nowhere", make_target("llama"))


def test_corrupt_safetensors_file_is_rejected(make_target, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointFormatError, match=r"could not be read as a safetensors file"):
        convert_longspec(tmp_path / "model.safetensors", make_target("llama"))


def test_pth_file_that_is_not_a_state_dict_is_rejected(make_target, tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "draft_model_weights.pth")
    with pytest.raises(CheckpointFormatError, match=r"holds a `list`, not a state dict"):
        convert_longspec(tmp_path / "draft_model_weights.pth", make_target("llama"))


def test_nested_pth_state_dict_is_rejected(make_target, tmp_path):
    target = make_target("llama")
    torch.save({"state_dict": random_longspec_weights(target.config), "step": 3}, tmp_path / "draft.pth")
    with pytest.raises(CheckpointFormatError, match=r"not a flat state dict: the entries state_dict, step"):
        convert_longspec(tmp_path / "draft.pth", target)


def test_garbage_pth_file_is_rejected(make_target, tmp_path):
    (tmp_path / "draft_model_weights.pth").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointFormatError, match=r"could not be read as a state dict saved with `torch.save`"):
        convert_longspec(tmp_path / "draft_model_weights.pth", make_target("llama"))


def test_format_fixed_settings_cannot_be_overridden(make_target, tmp_path):
    target = make_target("llama")
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    with pytest.raises(GlideConfigError, match=r"`final_norm` cannot be set when converting a LongSpec draft"):
        convert_longspec(checkpoint, target, final_norm=True)


def test_unknown_config_override_is_rejected(make_target, tmp_path):
    target = make_target("llama")
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    with pytest.raises(GlideConfigError, match=r"`slidingwindow` is not a `GlideConfig` field"):
        convert_longspec(checkpoint, target, slidingwindow=8)


def test_target_by_path_is_loaded_and_named_in_the_config(tiny_qwen2_path, make_target, tmp_path):
    target = make_target("qwen2")
    weights = random_longspec_weights(target.config)
    draft = convert_longspec(write_checkpoint(tmp_path / "longspec", weights, target.config), tiny_qwen2_path)
    assert draft.config.target_name_or_path == tiny_qwen2_path
    input_ids = random_ids(1, 8)
    torch.testing.assert_close(
        draft_logits(draft, input_ids),
        longspec_reference_logits(weights, target, input_ids, lag=1),
        atol=ATOL,
        rtol=0,
    )


def test_missing_target_path_raises_target_not_found(make_target, tmp_path):
    target = make_target("llama")
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    with pytest.raises(TargetNotFoundError, match=r"The target `.*nowhere` could not be loaded"):
        convert_longspec(checkpoint, str(tmp_path / "nowhere"))


def test_target_kwargs_with_a_loaded_target_are_rejected(make_target, tmp_path):
    target = make_target("llama")
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    with pytest.raises(ValueError, match=r"`target_kwargs` apply only when `target` is a name or path"):
        convert_longspec(checkpoint, target, target_kwargs={"dtype": torch.bfloat16})


def test_hub_repo_id_is_downloaded_when_no_local_path_exists(make_target, tmp_path, monkeypatch):
    target = make_target("llama")
    folder = write_checkpoint(tmp_path / "snapshot", random_longspec_weights(target.config), target.config)
    requested = []

    def fake_snapshot_download(repo_id, allow_patterns):
        requested.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)  # the repo id is not a local path here
    loaded = read_longspec_checkpoint("sail/longspec-test")
    assert requested[0][0] == "sail/longspec-test" and "config.json" in requested[0][1]
    assert loaded.weights_path == folder / "model.safetensors" and loaded.config["hidden_size"] == 64


# --- saving, the command line, and drafting ----------------------------------------------------------------------


def test_output_dir_saves_a_draft_that_loads_with_equal_logits(make_target, tmp_path):
    target = make_target("qwen2")
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    draft = convert_longspec(checkpoint, target, output_dir=tmp_path / "glide")
    saved = load_file(tmp_path / "glide" / "model.safetensors")
    assert sorted(saved) == sorted(draft.model.layer.state_dict(prefix="model.layer."))
    reloaded = GlideForCausalLM.from_pretrained(tmp_path / "glide", target_model=target)
    input_ids = random_ids(2, 10)
    assert torch.equal(draft_logits(reloaded, input_ids), draft_logits(draft, input_ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_converts_and_the_saved_draft_loads_with_equal_logits(
    family, make_target, tiny_target_paths, tmp_path, capsys
):
    target = make_target(family)
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    output = tmp_path / "glide"
    argv = [
        "convert-longspec",
        "--checkpoint",
        str(checkpoint),
        "--target",
        tiny_target_paths[family],
        "--output",
        str(output),
    ]
    assert cli_main(argv) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1
    assert "Converted 16 tensors" in summary[0] and "dropped 4 unused" in summary[0] and str(output) in summary[0]

    in_process = convert_longspec(checkpoint, target)
    reloaded = GlideForCausalLM.from_pretrained(output, target_model=target)
    assert reloaded.config.target_name_or_path == tiny_target_paths[family]
    input_ids = random_ids(2, 10)
    for lag in (1, 2):
        assert torch.equal(draft_logits(reloaded, input_ids, lag), draft_logits(in_process, input_ids, lag))


def test_cli_draft_loads_its_target_from_the_config(make_target, tiny_llama_path, tmp_path):
    target = make_target("llama")
    weights = random_longspec_weights(target.config)
    checkpoint = write_checkpoint(tmp_path / "longspec", weights, target.config, "pth_file")
    argv = [
        "convert-longspec",
        "--checkpoint",
        str(checkpoint),
        "--target",
        tiny_llama_path,
        "--output",
        str(tmp_path / "glide"),
    ]
    assert cli_main(argv) == 0
    draft = GlideForCausalLM.from_pretrained(tmp_path / "glide")
    input_ids = random_ids(1, 9)
    torch.testing.assert_close(
        draft_logits(draft, input_ids),
        longspec_reference_logits(weights, target, input_ids, lag=1),
        atol=ATOL,
        rtol=0,
    )


def test_cli_dtype_flag_sets_the_saved_dtype(make_target, tiny_llama_path, tmp_path, capsys):
    target = make_target("llama")
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    argv = [
        "convert-longspec",
        "--checkpoint",
        str(checkpoint),
        "--target",
        tiny_llama_path,
        "--output",
        str(tmp_path / "glide"),
        "--dtype",
        "bfloat16",
    ]
    assert cli_main(argv) == 0
    assert "(bfloat16)" in capsys.readouterr().out
    assert {t.dtype for t in load_file(tmp_path / "glide" / "model.safetensors").values()} == {torch.bfloat16}


def test_cli_refuses_to_write_into_the_checkpoint_folder(make_target, tiny_llama_path, tmp_path, capsys):
    target = make_target("llama")
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    argv = [
        "convert-longspec",
        "--checkpoint",
        str(checkpoint / "model.safetensors"),
        "--target",
        tiny_llama_path,
        "--output",
        str(checkpoint),
    ]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    assert "would overwrite the LongSpec files" in capsys.readouterr().err


@pytest.mark.parametrize("output", ["target", "existing draft"])
def test_cli_refuses_to_overwrite_the_target_or_a_saved_model(output, make_target, tiny_llama_path, tmp_path, capsys):
    target = make_target("llama")
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    folder = Path(tiny_llama_path) if output == "target" else tmp_path / "draft"
    if output == "existing draft":
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    files_before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    argv = ["convert-longspec", "--checkpoint", str(checkpoint), "--target", tiny_llama_path, "--output", str(folder)]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    assert ("is the --target folder" if output == "target" else "already holds a model") in capsys.readouterr().err
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == files_before


def test_cli_requires_a_target(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["convert-longspec", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--target" in capsys.readouterr().err


def test_cli_reports_a_bad_checkpoint_in_one_line(make_target, tiny_llama_path, tmp_path, capsys):
    target = make_target("llama")
    weights = random_longspec_weights(target.config)
    del weights["mlp.down_proj.weight"]
    checkpoint = write_checkpoint(tmp_path / "longspec", weights, target.config)
    argv = [
        "convert-longspec",
        "--checkpoint",
        str(checkpoint),
        "--target",
        tiny_llama_path,
        "--output",
        str(tmp_path / "glide"),
    ]
    assert cli_main(argv) == 1
    # The last line: Transformers' progress bar for loading the target may come first.
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("glide-hf convert-longspec: error:") and "mlp.down_proj.weight" in error
    assert not (tmp_path / "glide").exists()


@pytest.mark.parametrize(("family", "sliding_window"), [("llama", LONGSPEC_SLIDING_WINDOW), ("qwen2", 4)])
def test_converted_draft_as_assistant_keeps_greedy_output(family, sliding_window, make_target, tmp_path):
    target = make_target(family)
    checkpoint = write_checkpoint(tmp_path / "longspec", random_longspec_weights(target.config), target.config)
    draft = convert_longspec(checkpoint, target, sliding_window=sliding_window)
    for seed in range(2):
        prompt = random_ids(1, 10, seed=seed)
        expected = target.generate(prompt, max_new_tokens=20, do_sample=False)
        assisted = target.generate(prompt, assistant_model=draft, max_new_tokens=20, do_sample=False)
        assert torch.equal(expected, assisted)
