"""GlideConfig: derived fields, validation, serialisation, registration."""

import pytest
import torch
from test_modeling import build_draft, build_target
from transformers import AutoConfig, LlamaConfig, Qwen2Config

from glide_hf import GlideConfig, GlideConfigError, GlideForCausalLM, TargetMismatchError, UnsupportedTargetError


def llama_config(**overrides):
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0},
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def test_draft_shape_is_derived_from_the_target():
    config = GlideConfig(target_config=llama_config())
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        64,
        4,
        2,
        16,
    )
    assert (config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (128, 300, 4096)
    assert config.rms_norm_eps == 1e-5
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    assert config.sliding_window == 512 and config.target_kv_layer == -1 and config.target_kv_layer_index == 2
    assert config.num_hidden_layers == 1 and config.layer_types == ["sliding_attention"]


def test_intermediate_size_can_differ_from_the_target():
    assert GlideConfig(target_config=llama_config(), intermediate_size=96).intermediate_size == 96


def test_config_round_trips_through_a_dict_with_its_target():
    config = GlideConfig(target_config=llama_config(), sliding_window=32, target_name_or_path="me/target")
    restored = GlideConfig.from_dict(config.to_dict())
    assert isinstance(restored.target_config, LlamaConfig)
    assert restored.to_dict() == config.to_dict()


def test_qwen2_target_config_is_restored_as_qwen2():
    config = GlideConfig(
        target_config=Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
        )
    )
    assert isinstance(GlideConfig.from_dict(config.to_dict()).target_config, Qwen2Config)


def test_auto_config_knows_the_glide_model_type():
    config = AutoConfig.for_model("glide", target_config=llama_config().to_dict())
    assert isinstance(config, GlideConfig)


def test_target_config_is_copied_not_shared():
    target = build_target()
    draft = build_draft(target)
    assert draft.config.target_config is not target.config
    draft.config.target_config.vocab_size = 1
    assert target.config.vocab_size != 1


def test_setting_the_drafts_attention_does_not_unset_the_targets():
    target = build_target()
    draft = build_draft(target)
    draft.config._attn_implementation = "eager"
    assert target.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("window", [0, -3])
def test_sliding_window_below_one_is_rejected(window):
    with pytest.raises(GlideConfigError, match="sliding_window"):
        GlideConfig(target_config=llama_config(), sliding_window=window)


@pytest.mark.parametrize("layer", [3, -4, 10])
def test_target_kv_layer_out_of_range_is_rejected(layer):
    with pytest.raises(GlideConfigError, match=r"`target_kv_layer` must index one of the target's 3 layers"):
        GlideConfig(target_config=llama_config(), target_kv_layer=layer)


@pytest.mark.parametrize("field", ["max_draft_lag", "num_draft_tokens", "loss_chunk_size"])
def test_non_positive_counts_are_rejected(field):
    with pytest.raises(GlideConfigError, match=field):
        GlideConfig(target_config=llama_config(), **{field: 0})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sliding_window", True, "`sliding_window` must be an integer, got True"),
        ("target_kv_layer", 1.0, "`target_kv_layer` must be an integer, got 1.0"),
        ("intermediate_size", 2.5, "`intermediate_size` must be an integer, got 2.5"),
        ("rms_norm_eps", -1.0, "`rms_norm_eps` must be a positive number"),
        ("attention_dropout", 2, r"`attention_dropout` must be in \[0, 1\)"),
        ("initializer_range", -1, "`initializer_range`"),
        ("hidden_act", "nope", "`hidden_act='nope'` is not an activation"),
    ],
)
def test_fields_of_the_wrong_type_or_range_are_rejected_before_they_reach_torch(field, value, message):
    with pytest.raises(GlideConfigError, match=message):
        GlideConfig(target_config=llama_config(), **{field: value})


def test_a_target_config_without_rms_norm_is_refused_as_unsupported():
    with pytest.raises(UnsupportedTargetError, match="has no `rms_norm_eps`"):
        GlideConfig(target_config={"model_type": "bert"})


def test_from_target_refuses_misspelt_fields_and_takes_dtype_names():
    target = build_target()
    with pytest.raises(
        GlideConfigError, match="`sliding_windw` is not a `GlideConfig` field. Did you mean `sliding_window`"
    ):
        GlideForCausalLM.from_target(target, sliding_windw=4)
    with pytest.raises(GlideConfigError, match="`dtype` must be a `torch.dtype` or its name"):
        GlideForCausalLM.from_target(target, dtype="bfloat17")
    with pytest.raises(UnsupportedTargetError, match="got `NoneType`"):
        GlideForCausalLM.from_target(None)
    draft = GlideForCausalLM.from_target(target, dtype="bfloat16", attn_implementation="eager", sliding_window=4)
    assert draft.model.layer.mlp.up_proj.weight.dtype == torch.bfloat16 and draft.config.sliding_window == 4


def test_unknown_loss_implementation_is_rejected():
    with pytest.raises(GlideConfigError, match="loss_implementation"):
        GlideConfig(target_config=llama_config(), loss_implementation="fused")


def test_more_than_one_draft_layer_is_rejected():
    with pytest.raises(GlideConfigError, match="num_hidden_layers"):
        GlideConfig(target_config=llama_config(), num_hidden_layers=2)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", 32),
        ("num_attention_heads", 8),
        ("num_key_value_heads", 4),
        ("head_dim", 8),
        ("vocab_size", 301),
    ],
)
def test_shape_keys_that_contradict_the_target_name_both_values(field, value):
    expected = str(getattr(GlideConfig(target_config=llama_config()), field))
    with pytest.raises(TargetMismatchError, match=rf"`{field}` is {expected} .*`{field}={value}`"):
        GlideConfig(target_config=llama_config(), **{field: value})


def test_default_config_without_target_builds():
    config = GlideConfig()
    assert config.target_config is None and config.model_type == "glide"


def test_a_draft_from_a_config_without_target_config_is_refused():
    """The config may exist without a target (Transformers builds default configs); the model cannot."""
    with pytest.raises(GlideConfigError, match="names no target config.*from_target"):
        GlideForCausalLM(GlideConfig())
