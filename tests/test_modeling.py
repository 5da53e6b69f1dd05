"""The draft layer: shape, attention backends, visibility rule, frozen target, drafting == training forward."""

import contextlib

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from glide_hf import CacheStateError, GlideConfig, GlideForCausalLM, GlideModel, TargetNotAttachedError

VOCAB = 300


TARGET_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32}),  # heads * head_dim != hidden, as in Qwen3
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 16}),  # sliding-window target layers
}


def build_target(family: str = "llama", seed: int = 0, **overrides):
    config_class, model_class, family_fields = TARGET_FAMILIES[family]
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(family_fields)
    fields.update(overrides)
    torch.manual_seed(seed)
    return model_class(config_class(**fields)).eval()


def build_draft(target, seed: int = 1, **overrides):
    torch.manual_seed(seed)
    overrides.setdefault("sliding_window", 8)
    return GlideForCausalLM.from_target(target, **overrides).eval()


def random_ids(batch: int, length: int, seed: int = 2) -> torch.LongTensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_only_the_draft_layer_is_trainable(family):
    draft = build_draft(build_target(family))
    trainable = [name for name, p in draft.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith(("model.layer.", "model.norm.")) for name in trainable)
    assert not any(p.requires_grad for p in draft.target.parameters())


def test_draft_layer_has_the_longspec_modules_and_no_embedding_of_its_own():
    draft = build_draft(build_target())
    names = {name for name, _ in draft.named_parameters() if not name.startswith("model.target.")}
    layer = {name.removeprefix("model.layer.") for name in names if name.startswith("model.layer.")}
    assert {
        "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "cross_attn.q_proj.weight",
        "cross_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_self_attention_layernorm.weight",
        "post_cross_attention_layernorm.weight",
    } <= layer
    assert not any("cross_attn.k_proj" in n or "cross_attn.v_proj" in n for n in layer)
    assert not any("embed" in n or "lm_head" in n for n in names)
    assert draft.get_input_embeddings() is draft.target.get_input_embeddings()
    assert draft.get_output_embeddings() is draft.target.get_output_embeddings()


def test_final_norm_is_optional():
    draft = build_draft(build_target(), final_norm=False)
    assert draft.model.norm is None
    assert draft(random_ids(1, 6)).logits.shape == (1, 6, VOCAB)


def test_target_stays_in_eval_mode_when_the_draft_trains():
    draft = build_draft(build_target())
    draft.train()
    assert draft.training and draft.model.layer.training
    assert not draft.target.training
    assert not any(module.training for module in draft.target.modules())


def test_eval_forward_is_deterministic():
    draft = build_draft(build_target())
    ids = random_ids(2, 12)
    assert torch.equal(draft(ids).logits, draft(ids).logits)


def test_training_lag_is_random_within_max_draft_lag():
    draft = build_draft(build_target(), max_draft_lag=3).train()
    ids = random_ids(1, 10)
    seen = set()
    torch.manual_seed(0)
    for _ in range(30):
        logits = draft(ids, draft_lag=None, return_logits=True, labels=ids).logits
        for lag in (1, 2, 3):
            if torch.allclose(logits, draft.eval()(ids, draft_lag=lag).logits, atol=1e-6):
                seen.add(lag)
        draft.train()
    assert seen == {1, 2, 3}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_eager_and_sdpa_agree(family):
    target = build_target(family)
    draft = build_draft(target)
    ids = random_ids(2, 20)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding
    outputs = {}
    for implementation in ("eager", "sdpa"):
        draft.set_attn_implementation(implementation)
        outputs[implementation] = [draft(ids, attention_mask=mask, draft_lag=lag).logits for lag in (1, 3)]
    for eager, sdpa in zip(outputs["eager"], outputs["sdpa"]):
        torch.testing.assert_close(eager[0], sdpa[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(eager[1, :15], sdpa[1, :15], atol=1e-5, rtol=0)


def test_shifted_causal_cross_attention_equals_the_masked_one():
    draft = build_draft(build_target())
    cross = draft.model.layer.cross_attn
    torch.manual_seed(3)
    query = torch.randn(2, 4, 11, 16)
    keys, values = torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    for lag in (1, 2, 5, 11, 12):
        shifted = cross._attend_with_shift("sdpa", query, keys, values, lag)
        masked = cross._attend_with_mask("sdpa", query, keys, values, lag, None)
        torch.testing.assert_close(shifted, masked, atol=1e-6, rtol=0)


def test_draft_query_never_sees_unverified_target_keys():
    """Changing a token changes the target keys from that token on; a draft query at t with lag j must not move
    unless the change is at a token <= t - j (or inside its own self-attention window)."""
    target = build_target()
    draft = build_draft(target, sliding_window=1)  # self-attention sees only the token itself
    ids = random_ids(1, 16)
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 1 - 3) % (VOCAB - 3) + 3
    for lag in (1, 2, 4):
        before, after = draft(ids, draft_lag=lag).logits, draft(changed, draft_lag=lag).logits
        unaffected = 9 + lag  # queries t < 9 + lag see target keys of tokens < 9 only
        torch.testing.assert_close(before[0, :9], after[0, :9], atol=0, rtol=0)
        torch.testing.assert_close(before[0, 10:unaffected], after[0, 10:unaffected], atol=0, rtol=0)
        assert not torch.allclose(before[0, unaffected:], after[0, unaffected:])


def test_left_padding_does_not_change_a_row():
    target = build_target()
    draft = build_draft(target)
    ids = random_ids(1, 10)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    for lag in (1, 2):
        alone = draft(ids, draft_lag=lag).logits
        with_pad = draft(padded, attention_mask=mask, draft_lag=lag).logits[:, 3:]
        assert torch.isfinite(with_pad).all()
        torch.testing.assert_close(alone, with_pad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_drafting_logits_equal_training_logits_at_the_matching_lag(family):
    """Draft step s, run on a live target cache of the verified prefix, reads keys up to s + 1 tokens back; the
    training forward with `draft_lag=s + 1` gives the same logits (fp32; 1e-5 covers different kernel shapes)."""
    target = build_target(family)
    draft = build_draft(target, sliding_window=6)
    sequence = random_ids(1, 30)
    verified = 20  # the target cache holds tokens 0..19
    target_cache = DynamicCache(config=target.config)
    with torch.no_grad():
        target(sequence[:, :verified], cache=target_cache, use_cache=True)
        own_cache = DynamicCache(config=draft.config)
        draft(sequence[:, : verified + 1], cache=own_cache, use_cache=True, target_cache=target_cache)
        for step in range(5):
            position = verified + 1 + step  # token at `position` is fed; it predicts position + 1
            drafted = draft(
                sequence[:, position : position + 1], cache=own_cache, use_cache=True, target_cache=target_cache
            ).logits[:, -1]
            trained = draft(sequence[:, : position + 1], draft_lag=step + 2).logits[:, -1]
            torch.testing.assert_close(drafted, trained, atol=1e-5, rtol=0)


def test_glide_model_returns_the_hidden_states_the_lm_head_reads():
    target = build_target()
    draft = build_draft(target)
    base = GlideModel(draft.config)
    base.load_state_dict(
        {k.removeprefix("model."): v for k, v in draft.state_dict().items() if not k.startswith("model.target.")},
        strict=False,
    )
    base.attach_target(target).eval()
    ids = random_ids(1, 9)
    hidden = base(ids).last_hidden_state
    assert hidden.shape == (1, 9, 64)
    torch.testing.assert_close(target.lm_head(hidden), draft(ids).logits, atol=0, rtol=0)


def test_forward_without_target_raises():
    target = build_target()
    draft = GlideForCausalLM(GlideConfig(target_config=target.config, sliding_window=8))
    with pytest.raises(TargetNotAttachedError, match="attach_target"):
        draft(random_ids(1, 4))


def test_own_cache_without_target_cache_raises():
    draft = build_draft(build_target())
    cache = DynamicCache(config=draft.config)
    draft(random_ids(1, 5), cache=cache, use_cache=True, target_cache=DynamicCache())
    with pytest.raises(CacheStateError, match="target_cache"):
        draft(random_ids(1, 1), cache=cache, use_cache=True)


def test_draft_runs_in_bfloat16_beside_a_float32_target():
    target = build_target()
    draft = build_draft(target, dtype=torch.bfloat16)
    logits = draft(random_ids(1, 7)).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert draft.model.layer.mlp.up_proj.weight.dtype == torch.bfloat16
    assert target.lm_head.weight.dtype == torch.float32


def test_target_kv_layer_selects_the_layer_read():
    target = build_target(num_hidden_layers=3)
    ids = random_ids(1, 8)
    first = build_draft(target, target_kv_layer=0)
    last = build_draft(target, target_kv_layer=-1)
    last.load_state_dict(first.state_dict())
    assert not torch.allclose(first(ids).logits, last(ids).logits)
    keys, _ = first.model.capture_target_kv(ids, torch.ones_like(ids), torch.arange(8)[None])
    cache = DynamicCache(config=target.config)
    target(ids, cache=cache, use_cache=True)
    assert torch.equal(keys, cache.layers[0].keys)


def test_training_forward_stops_the_target_after_the_layer_it_reads():
    target = build_target(num_hidden_layers=4)
    draft = build_draft(target, target_kv_layer=1)
    calls = []
    handles = [
        layer.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
        for index, layer in enumerate(target.model.layers)
    ]
    ids = random_ids(1, 8)
    draft(ids, draft_lag=1)
    for handle in handles:
        handle.remove()
    assert calls == [0, 1]
    assert target.config.num_hidden_layers == 4
    assert [len(target.model.layers)] == [4]
    full = DynamicCache(config=target.config)
    target(ids, cache=full, use_cache=True)
    keys, values = draft.model.capture_target_kv(ids, torch.ones_like(ids), torch.arange(8)[None])
    assert torch.equal(keys, full.layers[1].keys) and torch.equal(values, full.layers[1].values)


def test_a_state_dict_without_the_target_loads_strictly_and_a_missing_draft_tensor_still_fails():
    # DeepSpeed resumes with a strict `load_state_dict` from an engine checkpoint that leaves the frozen target out.
    target = build_target()
    trained, fresh = build_draft(target, seed=1), build_draft(target, seed=2)
    draft_only = {name: tensor for name, tensor in trained.state_dict().items() if ".target." not in name}
    assert len(draft_only) < len(trained.state_dict())
    fresh.load_state_dict(draft_only, strict=True)
    ids = random_ids(1, 12)
    torch.testing.assert_close(fresh(ids).logits, trained(ids).logits, rtol=0, atol=0)
    del draft_only["model.layer.mlp.down_proj.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*model\.layer\.mlp\.down_proj\.weight"):
        fresh.load_state_dict(draft_only, strict=True)
    # The glide model alone (keys without the `model.` prefix) forgives its target too.
    fresh.model.load_state_dict(
        {
            k.removeprefix("model."): v
            for k, v in trained.state_dict().items()
            if ".target." not in k and k.startswith("model.")
        },
        strict=True,
    )


def test_batched_drafting_cross_attention_equals_eager_with_several_queries():
    """Drafting with a key-padding mask: sdpa attends the query heads of each key head as one group (no copy of the
    target's keys per query head); it must equal eager's repeated-heads attention, for one query and for several."""
    draft = build_draft(build_target())  # 4 query heads over 2 key heads
    cross = draft.model.layer.cross_attn
    torch.manual_seed(4)
    hidden = torch.randn(2, 5, draft.config.hidden_size)
    keys, values = torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 16)
    padding = torch.ones(2, 13, dtype=torch.long)
    padding[1, 9:] = 0  # row 1's verified prefix is 9 slots
    position_ids = torch.arange(20, 25)[None].expand(2, -1)
    cos_sin = draft.target.model.rotary_emb(hidden, position_ids)
    outputs = {}
    for implementation in ("eager", "sdpa"):
        draft.set_attn_implementation(implementation)
        outputs[implementation] = [
            cross(hidden[:, :queries], cos_sin_part, keys, values, key_padding_mask=padding)
            for queries, cos_sin_part in ((1, tuple(t[:, :1] for t in cos_sin)), (5, cos_sin))
        ]
    for eager, sdpa in zip(outputs["eager"], outputs["sdpa"]):
        torch.testing.assert_close(sdpa, eager, atol=1e-6, rtol=0)
    changed = values.clone()
    changed[1, :, 9:] += 1.0  # slots beyond row 1's prefix: no effect on it
    again = cross(hidden, cos_sin, keys, changed, key_padding_mask=padding)
    torch.testing.assert_close(again[1], outputs["sdpa"][1][1], atol=0, rtol=0)


def test_drafting_with_target_lengths_equals_drafting_with_the_prefix_mask():
    """`target_lengths` (what the engine passes) means the same as a `target_attention_mask` of each row's first
    `length` slots, inside `fused_for_inference` too (on the CPU the mask path computes it); giving both is refused."""
    target = build_target()
    draft = build_draft(target)
    ids = random_ids(2, 14)
    target_cache = DynamicCache(config=target.config)
    lengths = torch.tensor([9, 14])
    prefix = (torch.arange(14)[None] < lengths[:, None]).long()
    with torch.no_grad():
        target(ids, cache=target_cache, use_cache=True)
        fed = ids[:, -3:]
        with_mask = draft(fed, target_cache=target_cache, target_attention_mask=prefix).logits
        with_lengths = draft(fed, target_cache=target_cache, target_lengths=lengths).logits
        with draft.fused_for_inference():
            fused = draft(fed, target_cache=target_cache, target_lengths=lengths).logits
        everything = draft(fed, target_cache=target_cache).logits
    torch.testing.assert_close(with_lengths, with_mask, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused, with_mask, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_lengths[0], everything[0], atol=1e-3)  # row 0 sees 9 of 14 slots
    torch.testing.assert_close(with_lengths[1], everything[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="target_lengths"):
        draft(fed, target_cache=target_cache, target_attention_mask=prefix, target_lengths=lengths)
    with pytest.raises(ValueError, match="target_lengths"):
        draft(fed, target_lengths=lengths)
    for wrong in (torch.tensor([9, 14, 3]), lengths.float(), lengths[:1], [9, 14]):  # not one integer per row
        with pytest.raises(ValueError, match=r"`target_lengths` must be an integer tensor of shape \[batch\] = \[2\]"):
            draft(fed, target_cache=target_cache, target_lengths=wrong)


def test_labels_of_another_shape_or_dtype_than_the_tokens_are_refused():
    """The loss shifts `labels` itself: they must be the tokens' shape, as integers. Labels of another shape with as
    many shifted targets would otherwise give a loss over misaligned tokens."""
    draft = build_draft(build_target())
    ids = random_ids(2, 7)
    with pytest.raises(ValueError, match=r"shape of the input tokens \(2, 7\), got \(3, 5\)"):
        draft(ids, labels=random_ids(3, 5))
    with pytest.raises(ValueError, match="integer token ids"):
        draft(ids, labels=ids.float())
    assert torch.isfinite(draft(ids, labels=ids).loss)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_for_inference_keeps_the_draft_output_and_drops_the_copies_on_exit(family):
    """Inside `fused_for_inference` the self-attention's q/k/v and the MLP's gate/up run as one GEMM each, with the
    same logits; on exit the copies are gone, and weights changed in between are used on the next entry."""
    draft = build_draft(build_target(family))
    layer = draft.model.layer
    ids = random_ids(2, 12)
    with torch.no_grad():
        expected = draft(ids, draft_lag=2).logits
        with draft.fused_for_inference():
            assert layer.self_attn.fused_qkv is not None and layer.mlp.fused_gate_up is not None
            assert (layer.self_attn.fused_qkv[1] is None) == (layer.self_attn.q_proj.bias is None)
            fused = draft(ids, draft_lag=2).logits
        assert layer.self_attn.fused_qkv is None and layer.mlp.fused_gate_up is None
        torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
        layer.self_attn.k_proj.weight.mul_(2.0)
        layer.mlp.up_proj.weight.mul_(0.5)
        changed = draft(ids, draft_lag=2).logits
        with draft.fused_for_inference():
            fused_changed = draft(ids, draft_lag=2).logits
    assert not torch.allclose(changed, expected, atol=1e-3)
    torch.testing.assert_close(fused_changed, changed, atol=1e-5, rtol=1e-5)


def test_fused_for_inference_keeps_gradients_where_they_are_enabled():
    """With gradients enabled the block changes nothing: the loss's gradient reaches the draft's own weights, even
    when the block was entered without gradients (its copies then carry none)."""
    draft = build_draft(build_target()).train()
    ids = random_ids(2, 12)
    with contextlib.ExitStack() as stack:
        with torch.no_grad():
            stack.enter_context(draft.fused_for_inference())
        loss = draft(ids, labels=ids, draft_lag=2).loss
    loss.backward()
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj", "input_layernorm"):
        weight = draft.model.layer.get_submodule(name).weight
        assert weight.grad is not None and weight.grad.abs().sum() > 0, name


def test_fused_for_inference_leaves_lora_projections_separate():
    peft = pytest.importorskip("peft")
    from glide_hf.lora import glide_lora_config

    draft = build_draft(build_target())
    peft_draft = peft.get_peft_model(draft, glide_lora_config(r=4, modules=("self_attn",)))
    layer = draft.model.layer
    with torch.no_grad(), draft.fused_for_inference():
        assert layer.self_attn.fused_qkv is None  # LoRA layers: unchanged path
        assert layer.mlp.fused_gate_up is not None  # no adapters on the MLP here
        out = peft_draft(input_ids=random_ids(1, 10), draft_lag=2).logits
    assert torch.isfinite(out).all()


def test_fused_projections_are_refreshed_into_kept_storage():
    """`fused_for_inference(kept_weights)` writes each block's concatenated weights into the same tensors (a CUDA
    graph captured earlier reads them), with the current weights."""
    draft = build_draft(build_target())
    attention = draft.model.layer.self_attn
    kept = {}
    with torch.no_grad(), draft.fused_for_inference(kept):
        weight, _ = attention.fused_qkv
    attention.q_proj.weight.data.mul_(2)
    with torch.no_grad(), draft.fused_for_inference(kept):
        refreshed, _ = attention.fused_qkv
        rows = attention.q_proj.weight.shape[0]
        assert refreshed.data_ptr() == weight.data_ptr()
        assert torch.equal(refreshed[:rows], attention.q_proj.weight)
    assert attention.fused_qkv is None and len(kept) == 2  # the attention's and the MLP's


def test_a_target_cache_without_the_layer_the_draft_reads_is_refused():
    """A cache from another model (fewer layers than the layer the draft reads) would leave the draft without any
    target context: an error, not a silent draft from nothing. A new, empty cache reads as no context."""
    from transformers import DynamicCache

    from glide_hf import CacheStateError
    from glide_hf.modeling_glide import read_target_kv

    target = build_target(num_hidden_layers=2)
    with torch.no_grad():
        cache = target(random_ids(1, 5), use_cache=True).cache
    assert read_target_kv(cache, 1)[0].shape[-2] == 5
    assert read_target_kv(DynamicCache(), 3) is None
    with pytest.raises(CacheStateError, match="has 2 layers, but the draft reads layer 3"):
        read_target_kv(cache, 3)


def test_attaching_a_target_of_another_depth_is_refused():
    from glide_hf import TargetMismatchError

    draft = build_draft(build_target(num_hidden_layers=4))
    with pytest.raises(TargetMismatchError, match="`num_hidden_layers` is 2 but the GLIDE draft was built for"):
        draft.attach_target(build_target(num_hidden_layers=2))
