"""The GLIDE engine, `draft.generate()`: exact greedy output for batches, chains, trees and CAPE; the target's
distribution when sampling; constant draft memory; clear errors."""

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_assisted import CHI2_CRITICAL_63_DOF, build_agreeing_pair
from test_modeling import VOCAB, build_draft, build_target, random_ids
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from glide_hf import GlideConfigError, GlideForCausalLM, TargetNotAttachedError, UnsupportedGenerationError
from glide_hf.engine import GlideGenerateOutput

STRATEGIES = {
    "chain": dict(draft_strategy="chain", num_draft_tokens=4),
    "tree": dict(draft_strategy="tree", tree_widths=(3, 4, 4)),
    "cape": dict(draft_strategy="cape", num_draft_tokens=3),
}


def left_pad(prompts: list[torch.Tensor], pad: int = 0):
    width = max(prompt.shape[-1] for prompt in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=prompts[0].device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.shape[-1] :] = prompt
        mask[row, width - prompt.shape[-1] :] = 1
    return ids, mask


def assert_rows_equal_single_generation(target, draft, prompts, max_new_tokens, **engine_kwargs):
    ids, mask = left_pad(prompts)
    out = draft.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **engine_kwargs)
    for row, prompt in enumerate(prompts):
        expected = target.generate(prompt[None], max_new_tokens=max_new_tokens, do_sample=False)[0, prompt.shape[-1] :]
        got = out[row, ids.shape[1] : ids.shape[1] + expected.shape[0]]
        assert torch.equal(got, expected), (row, got, expected)
        assert (out[row, ids.shape[1] + expected.shape[0] :] == target.generation_config.pad_token_id).all()


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_engine_output_equals_target_output(family, strategy):
    target = build_target(family)
    draft = build_draft(target, sliding_window=6)
    prompts = [random_ids(1, length, seed=length)[0] for length in (3, 11)]
    assert_rows_equal_single_generation(target, draft, prompts, 24, **STRATEGIES[strategy])


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_greedy_batches_of_different_prompt_lengths_equal_single_generation(batch_size):
    target = build_target()
    draft = build_draft(target, sliding_window=5)
    prompts = [random_ids(1, 2 + 7 * row, seed=row)[0] for row in range(batch_size)]
    assert_rows_equal_single_generation(target, draft, prompts, 20, **STRATEGIES["tree"])


def test_prompts_longer_than_the_sliding_window_and_long_generations_are_exact():
    target = build_target()
    draft = build_draft(target, sliding_window=3)
    prompts = [random_ids(1, 40, seed=1)[0], random_ids(1, 9, seed=2)[0]]
    assert_rows_equal_single_generation(target, draft, prompts, 50, **STRATEGIES["chain"])


def test_end_of_sequence_stops_one_row_and_not_the_others():
    target = build_target()
    draft = build_draft(target)
    prompts = [random_ids(1, 5, seed=3)[0], random_ids(1, 8, seed=4)[0]]
    free = target.generate(prompts[0][None], max_new_tokens=30, do_sample=False)[0, 5:]
    eos = int(free[6])  # a token row 0 produces early becomes end-of-sequence
    target.generation_config.eos_token_id = eos
    try:
        assert_rows_equal_single_generation(target, draft, prompts, 30, **STRATEGIES["chain"])
        ids, mask = left_pad(prompts)
        out = draft.generate(
            ids, attention_mask=mask, max_new_tokens=30, do_sample=False, return_dict_in_generate=True
        )
    finally:
        target.generation_config.eos_token_id = 2
    first_eos = int((free == eos).nonzero()[0])
    assert out.new_tokens[0] == first_eos + 1
    assert out.new_tokens[1] > out.new_tokens[0]
    assert out.accepted_per_round[-1, 0] == -1  # row 0 left the batch before the last round


def test_min_new_tokens_holds_end_of_sequence_back_as_the_target_does():
    target = build_target()
    draft = build_draft(target)
    prompt = random_ids(1, 5, seed=3)
    free = target.generate(prompt, max_new_tokens=30, do_sample=False)[0, 5:]
    eos = int(free[3])
    expected = target.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=eos, min_new_tokens=10)
    got = draft.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=eos, min_new_tokens=10)
    assert torch.equal(expected, got)


def test_return_dict_reports_acceptance_statistics():
    target = build_target()
    draft = build_draft(target)
    ids, mask = left_pad([random_ids(1, 6, seed=1)[0], random_ids(1, 4, seed=2)[0]])
    out = draft.generate(
        ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None, return_dict_in_generate=True
    )
    assert isinstance(out, GlideGenerateOutput)
    assert out.accepted_per_round.shape == (out.num_rounds, 2)
    assert out.num_target_forwards == out.num_rounds + 1
    assert out.new_tokens.tolist() == [16, 16]
    accepted = out.accepted_per_round.clamp(min=0).sum(0)
    assert torch.equal(accepted + out.num_rounds + 1 >= out.new_tokens, torch.tensor([True, True]))
    assert out.tokens_per_target_forward == pytest.approx(32 / out.num_target_forwards)
    # Fields of Transformers' `GenerateDecoderOnlyOutput` the engine does not fill read as None there too.
    assert out.scores is None and out.logits is None and out.past_key_values is None


def test_agreeing_draft_accepts_every_drafted_token():
    target, draft = build_agreeing_pair()
    prompt = random_ids(1, 6)
    out = draft.generate(
        prompt, max_new_tokens=31, do_sample=False, eos_token_id=None, return_dict_in_generate=True, num_draft_tokens=5
    )
    assert torch.equal(out.sequences, target.generate(prompt, max_new_tokens=31, do_sample=False, eos_token_id=None))
    assert out.accepted_per_round[:-1].eq(5).all()
    assert out.tokens_per_target_forward > 5


def test_draft_memory_does_not_grow_with_the_context(monkeypatch):
    """The draft's cache is a ring of `sliding_window + 2` slots plus the tree's slots, whatever the prompt."""
    target = build_target()
    draft = build_draft(target, sliding_window=4)
    shapes = []
    forward = draft.model.forward

    def record(*args, **kwargs):
        shapes.append(tuple(kwargs["cache"].layers[0].keys.shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(draft.model, "forward", record)
    for length in (5, 300):
        draft.generate(random_ids(1, length), max_new_tokens=8, do_sample=False, **STRATEGIES["tree"])
    num_nodes = 1 + sum(STRATEGIES["tree"]["tree_widths"])
    assert set(shapes) == {(1, 2, 4 + 2 + num_nodes, 16)}


# Sampling: the engine's first two tokens follow the target's exact two-token distribution.
def _two_token_setup():
    vocab = 8
    target = build_target(vocab_size=vocab, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    with torch.no_grad():
        target.lm_head.weight.mul_(3)
    draft = build_draft(target)
    prompt = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        first = torch.softmax(target(prompt).logits[0, -1], -1)
        extended = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)
        second = torch.softmax(target(extended).logits[:, -1], -1)
    return target, draft, prompt, first[:, None] * second


def _chi_square(counts, probabilities):
    expected = counts.sum() * probabilities
    return float(((counts - expected) ** 2 / expected).sum())


def _two_token_chi_square(out, probabilities):
    """Chi-square of the last two tokens of each row of `out` against `probabilities` over the 64 cells."""
    counts = torch.zeros(8, 8)
    counts.index_put_((out[:, -2], out[:, -1]), torch.ones(out.shape[0]), accumulate=True)
    return _chi_square(counts, probabilities)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_sampling_follows_the_target_distribution(strategy):
    """Chi-square over the 64 cells of the first two tokens, 4000 rows in one batch (fixed seed, alpha 0.001)."""
    target, draft, prompt, exact = _two_token_setup()
    torch.manual_seed(0)
    out = draft.generate(
        prompt.repeat(4000, 1), max_new_tokens=2, do_sample=True, pad_token_id=0, **STRATEGIES[strategy]
    )
    assert _two_token_chi_square(out, exact) < CHI2_CRITICAL_63_DOF


def test_the_sampling_test_rejects_a_sampler_that_trusts_the_draft():
    """Negative control: forcing acceptance of every drafted token (a benchmark-only switch) must fail the test."""
    target, draft, prompt, exact = _two_token_setup()
    torch.manual_seed(0)
    out = draft.generate(
        prompt.repeat(4000, 1),
        max_new_tokens=2,
        do_sample=True,
        pad_token_id=0,
        draft_strategy="chain",
        num_draft_tokens=1,
        forced_acceptance=1,
    )
    assert _two_token_chi_square(out, exact) > CHI2_CRITICAL_63_DOF


def test_top_k_and_top_p_keep_samples_in_the_targets_support():
    target = build_target()
    draft = build_draft(target)
    prompt = random_ids(1, 5)
    with torch.no_grad():
        allowed = target(prompt).logits[0, -1].topk(3).indices
    torch.manual_seed(0)
    out = draft.generate(prompt.repeat(200, 1), max_new_tokens=1, do_sample=True, top_k=3, top_p=0.99)
    assert torch.isin(out[:, -1], allowed).all()


class StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_stopping_criteria_end_generation_where_the_target_stops():
    target = build_target()
    draft = build_draft(target)
    prompt = random_ids(1, 5)
    criteria = StoppingCriteriaList([StopAfter(12)])
    settings = dict(max_new_tokens=40, do_sample=False, eos_token_id=None, stopping_criteria=criteria)
    expected = target.generate(prompt, **settings)
    got = draft.generate(prompt, **settings)
    assert got.shape[1] == 12
    assert torch.equal(expected, got)


def test_unsupported_outputs_are_rejected():
    draft = build_draft(build_target())
    with pytest.raises(UnsupportedGenerationError, match="output_scores"):
        draft.generate(random_ids(1, 4), max_new_tokens=3, output_scores=True, return_dict_in_generate=True)


def test_draft_follows_its_target_to_the_targets_device():
    target = build_target().to(torch.float64)
    draft = GlideForCausalLM.from_target(target, sliding_window=4, dtype=torch.float64)
    assert draft.model.layer.mlp.up_proj.weight.dtype == torch.float64
    assert draft.model.layer.mlp.up_proj.weight.device == target.lm_head.weight.device


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (dict(input_ids=random_ids(2, 6).float()), UnsupportedGenerationError, "integer token ids, got dtype"),
        (dict(input_ids=random_ids(2, 6).tolist()), UnsupportedGenerationError, r"`\[batch, length\]` tensor"),
        (dict(input_ids=random_ids(2, 6)[:0]), UnsupportedGenerationError, r"`\[batch, length\]` tensor"),
        (dict(input_ids=torch.tensor([[5, 6, VOCAB]])), UnsupportedGenerationError, f"0..{VOCAB - 1}"),
        (dict(input_ids=torch.tensor([[5, -1, 7]])), UnsupportedGenerationError, "ids from -1"),
        (dict(attention_mask=torch.ones(2, 5, dtype=torch.long)), UnsupportedGenerationError, "shape of `input_ids`"),
        (dict(attention_mask=torch.full((2, 6), 2)), UnsupportedGenerationError, "1 for tokens and 0 for padding"),
        (dict(eos_token_id=VOCAB), UnsupportedGenerationError, "`eos_token_id` must be token ids"),
        (dict(eos_token_id=-1), UnsupportedGenerationError, "`eos_token_id` must be token ids"),
        (dict(eos_token_id=[[5, 2]]), UnsupportedGenerationError, "`eos_token_id` must be token ids"),
        (dict(pad_token_id=-7), UnsupportedGenerationError, "`pad_token_id` must be token ids"),
        (dict(repetition_penalty=0.0), UnsupportedGenerationError, "`repetition_penalty` must be a positive"),
        (dict(num_draft_tokens=0), GlideConfigError, "positive integer `num_draft_tokens`, got 0"),
        (dict(num_draft_tokens=2.5), GlideConfigError, "positive integer `num_draft_tokens`, got 2.5"),
        (dict(draft_strategy="tree", tree_widths=(2.7, 3)), GlideConfigError, "`tree_widths` must be"),
        (dict(draft_strategy="tree", tree_widths=4), GlideConfigError, "`tree_widths` must be"),
        (dict(draft_strategy="cape", cape_bins=(4, 3, 2)), GlideConfigError, "`cape_bins` must be 11 positive"),
        (dict(tree_widths=(4, 4)), GlideConfigError, "`tree_widths` applies to `draft_strategy='tree'`"),
        (dict(draft_strategy="tree", cape_bins=(2,) * 11), GlideConfigError, "`cape_bins` applies to"),
    ],
)
def test_bad_generate_arguments_get_a_typed_error_that_names_them(arguments, error, message):
    """Wrong ids, masks, special tokens and drafting arguments are refused before any forward, with what was wrong,
    instead of an error from inside torch or a silently different setting."""
    draft = build_draft(build_target())
    arguments = {"input_ids": random_ids(2, 6), "max_new_tokens": 4, **arguments}
    with pytest.raises(error, match=message):
        draft.generate(**arguments)


def test_settings_only_transformers_processors_implement_give_the_targets_output():
    """`min_length` and `exponential_decay_length_penalty` change which token ends a row: the engine runs them
    through Transformers' own processor list (the host path), so its output is still the target's."""
    target = build_target()
    draft = build_draft(target)
    prompt = random_ids(2, 6)
    eos = int(target.generate(prompt[:1], max_new_tokens=1, do_sample=False)[0, -1])  # row 0's first new token
    for setting in (dict(min_length=10), dict(exponential_decay_length_penalty=(0, 100.0))):
        settings = dict(max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0, **setting)
        expected = target.generate(prompt, **settings)
        assert torch.equal(draft.generate(prompt, **settings), expected), setting
    assert not torch.equal(
        draft.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0),
        target.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0, min_length=10),
    )  # the setting matters here: without it the output differs


def test_stopping_criteria_as_a_plain_list_and_max_time_are_honoured():
    """`stopping_criteria` may be a plain list, as `target.generate` takes it; `max_time` stops every row."""
    target = build_target()
    draft = build_draft(target)
    prompt = random_ids(1, 6)

    class StopAtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 11, dtype=torch.bool)

    settings = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    expected = target.generate(prompt, stopping_criteria=StoppingCriteriaList([StopAtLength()]), **settings)
    assert expected.shape[1] == 11
    assert torch.equal(draft.generate(prompt, stopping_criteria=[StopAtLength()], **settings), expected)
    timed_out = draft.generate(prompt, max_time=0.0, num_draft_tokens=4, **settings)
    assert timed_out.shape[1] == 7  # the first round's first new token, then the time is up


@pytest.mark.parametrize("result", ["one too many", "floats", "none"])
def test_a_stopping_criterion_of_the_wrong_shape_gets_a_typed_error(result):
    draft = build_draft(build_target())

    class Wrong(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            rows = input_ids.shape[0]
            return {"one too many": torch.zeros(rows + 1, dtype=torch.bool), "floats": torch.zeros(rows)}.get(result)

    with pytest.raises(UnsupportedGenerationError, match="stopping criterion"):
        draft.generate(random_ids(2, 6), max_new_tokens=6, stopping_criteria=[Wrong()])


def test_models_and_inputs_on_different_devices_get_a_clear_error():
    """The engine's caches, masks and graphs live on one device. A target spread over devices (here one layer on
    `meta`, as offloading leaves it), or inputs elsewhere than the models, are refused before any computation with
    what to do, instead of an error from inside torch."""
    prompt = random_ids(1, 6)
    target = build_target()
    draft = build_draft(target)
    target.model.layers[1].to("meta")
    with pytest.raises(UnsupportedGenerationError, match=r"on one device.*\['cpu', 'meta'\].*device_map="):
        draft.generate(prompt, max_new_tokens=3)
    draft = build_draft(build_target())
    with pytest.raises(UnsupportedGenerationError, match=r"`input_ids` is on meta but the models are on cpu"):
        draft.generate(prompt.to("meta"), max_new_tokens=3)
    with pytest.raises(UnsupportedGenerationError, match=r"`attention_mask` is on meta"):
        draft.generate(prompt, attention_mask=torch.ones_like(prompt, device="meta"), max_new_tokens=3)
    # The same models and inputs on one device generate.
    assert draft.generate(prompt, max_new_tokens=3, do_sample=False).shape == (1, 9)


def test_streamer_receives_prompt_then_every_new_token():
    target = build_target()
    draft = build_draft(target)
    received = []

    class Collect:
        def put(self, value):
            received.append(value.reshape(-1).tolist())

        def end(self):
            received.append("end")

    prompt = random_ids(1, 5)
    out = draft.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, streamer=Collect())
    assert received[0] == prompt[0].tolist() and received[-1] == "end"
    assert sum(received[1:-1], []) == out[0, 5:].tolist()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    window=st.integers(1, 9),
    lengths=st.lists(st.integers(1, 14), min_size=1, max_size=3),
    strategy=st.sampled_from(sorted(STRATEGIES)),
    kv_heads=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 1000),
)
def test_greedy_output_is_exact_over_random_configurations(window, lengths, strategy, kv_heads, seed):
    target = build_target(num_key_value_heads=kv_heads, seed=seed)
    draft = build_draft(target, sliding_window=window, seed=seed + 1)
    prompts = [random_ids(1, length, seed=seed + row)[0] for row, length in enumerate(lengths)]
    assert_rows_equal_single_generation(target, draft, prompts, 10, **STRATEGIES[strategy])


def test_unknown_generation_arguments_are_rejected():
    draft = build_draft(build_target())
    with pytest.raises(TypeError, match="max_new_tokenz"):
        draft.generate(random_ids(1, 4), max_new_tokenz=3)


def test_beam_search_is_rejected_with_a_clear_error():
    draft = build_draft(build_target())
    with pytest.raises(UnsupportedGenerationError, match="num_beams"):
        draft.generate(random_ids(1, 4), max_new_tokens=3, num_beams=2)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_history_dependent_processing_equals_the_targets(strategy):
    """Repetition penalty, no-repeat n-grams and a user processor read each token's history: the engine applies
    them per tree node with that node's own history, and greedy output stays identical, for a padded batch too."""
    target = build_target()
    draft = build_draft(target)
    settings = dict(repetition_penalty=1.3, no_repeat_ngram_size=3, max_new_tokens=20, do_sample=False)
    prompts = [random_ids(1, 6, seed=5)[0], random_ids(1, 3, seed=6)[0]]
    ids, mask = left_pad(prompts)
    expected = target.generate(ids, attention_mask=mask, **settings)
    got = draft.generate(ids, attention_mask=mask, **settings, **STRATEGIES[strategy])
    assert torch.equal(expected, got)


class BanToken(LogitsProcessor):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        return scores.masked_fill(torch.arange(scores.shape[-1]) == self.token, float("-inf"))


def test_user_logits_processor_is_applied_at_every_node():
    target = build_target()
    draft = build_draft(target)
    prompt = random_ids(1, 5, seed=3)
    free = target.generate(prompt, max_new_tokens=20, do_sample=False)
    banned = int(free[0, 9])
    processors = LogitsProcessorList([BanToken(banned)])
    expected = target.generate(prompt, max_new_tokens=20, do_sample=False, logits_processor=processors)
    got = draft.generate(prompt, max_new_tokens=20, do_sample=False, logits_processor=processors)
    assert torch.equal(expected, got)
    assert banned not in got[0, 5:].tolist()


def test_prompt_beyond_the_targets_positions_is_rejected():
    draft = build_draft(build_target(max_position_embeddings=32))
    with pytest.raises(UnsupportedGenerationError, match="max_position_embeddings=32"):
        draft.generate(random_ids(1, 30), max_new_tokens=8)


def test_generate_without_a_target_is_rejected():
    target = build_target()
    from glide_hf import GlideConfig

    draft = GlideForCausalLM(GlideConfig(target_config=target.config, sliding_window=8))
    with pytest.raises(TargetNotAttachedError, match="no target attached"):
        draft.generate(random_ids(1, 4), max_new_tokens=3)


def test_unknown_strategy_and_bad_tree_widths_are_rejected():
    draft = build_draft(build_target())
    with pytest.raises(GlideConfigError, match="draft_strategy"):
        draft.generate(random_ids(1, 4), max_new_tokens=3, draft_strategy="beam")
    with pytest.raises(GlideConfigError, match="tree_widths"):
        draft.generate(random_ids(1, 4), max_new_tokens=3, draft_strategy="tree", tree_widths=(2, 0))
    with pytest.raises(GlideConfigError, match="tree_widths"):
        draft.generate(random_ids(1, 4), max_new_tokens=3, draft_strategy="tree", tree_widths=(VOCAB + 1,))


def test_engine_is_exact_with_eager_attention():
    target = build_target()
    draft = build_draft(target, sliding_window=5)
    target.set_attn_implementation("eager")
    draft.set_attn_implementation("eager")
    prompts = [random_ids(1, 9, seed=7)[0], random_ids(1, 4, seed=8)[0]]
    assert_rows_equal_single_generation(target, draft, prompts, 16, **STRATEGIES["tree"])


def test_max_length_not_beyond_the_prompt_is_rejected():
    draft = build_draft(build_target())
    with pytest.raises(UnsupportedGenerationError, match="max_length=5"):
        draft.generate(random_ids(1, 5), max_length=5)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_split_verify_attention_is_exact(family, strategy, monkeypatch):
    """Prefix and tree attended separately and merged by log-sum-exp (the reference prefix on the CPU) give the
    target's greedy output, for batches of different prompt lengths and grouped key/value heads."""
    from glide_hf import tree_attention

    split_calls = []
    original = tree_attention._tree_part
    monkeypatch.setattr(tree_attention, "_tree_part", lambda *args: split_calls.append(1) or original(*args))
    target = build_target(family)
    draft = build_draft(target, sliding_window=4)
    prompts = [random_ids(1, length, seed=length)[0] for length in (2, 9, 17)]
    assert_rows_equal_single_generation(target, draft, prompts, 24, verify_attention="split", **STRATEGIES[strategy])
    assert split_calls, "the verify forward did not go through the split attention"
    assert target.config._attn_implementation == "sdpa"  # restored after each verify forward


def test_split_verify_attention_equals_the_masked_attention_output():
    """One layer's split tree attention equals sdpa with the explicit mask, including rows of different lengths."""
    from glide_hf.static_cache import SlotCache
    from glide_hf.tree_attention import TreeAttentionInputs, tree_attention_forward

    torch.manual_seed(0)
    batch, heads, kv_heads, nodes, slots, dim = 3, 4, 2, 5, 23, 8
    cache = SlotCache.allocate(1, batch, kv_heads, slots, dim, torch.float32, "cpu")
    layer = cache.layers[0]
    layer.keys.copy_(torch.randn(batch, kv_heads, slots, dim))
    layer.values.copy_(torch.randn(batch, kv_heads, slots, dim))
    lengths = torch.tensor([1, 7, 15])
    node_slots = lengths[:, None] + torch.arange(nodes)[None]
    parents = torch.tensor([-1, 0, 0, 1, 2])  # a small tree: node i's parent
    visible = torch.eye(nodes, dtype=torch.bool)
    for node in range(1, nodes):
        visible[node] |= visible[parents[node]]
    visible = visible[None].expand(batch, -1, -1)
    query = torch.randn(batch, heads, nodes, dim)

    slot = torch.arange(slots)[None, None, :]
    offset = slot - lengths[:, None, None]  # [B, 1, S]
    tree_visible = (
        visible.gather(2, offset.clamp(0, nodes - 1).expand(-1, nodes, -1)) & (offset >= 0) & (offset < nodes)
    )
    mask = ((offset < 0) | tree_visible)[:, None]  # [B, 1, N, S]
    expected = torch.nn.functional.scaled_dot_product_attention(
        query,
        layer.keys.repeat_interleave(heads // kv_heads, 1),
        layer.values.repeat_interleave(heads // kv_heads, 1),
        attn_mask=mask,
    ).transpose(1, 2)
    inputs = TreeAttentionInputs.build(lengths, node_slots, visible, slots, "torch")
    got, _ = tree_attention_forward(None, query, layer.keys, layer.values, None, glide_tree=inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert layer.key_storage.is_contiguous() and layer.keys.shape == (batch, kv_heads, slots, dim)


def test_split_verify_attention_rejects_sliding_window_targets_and_unknown_modes():
    target = build_target("mistral")
    draft = build_draft(target, sliding_window=4)
    prompt = random_ids(1, 5, seed=0)
    with pytest.raises(UnsupportedGenerationError, match="verify_attention='masked'"):
        draft.generate(prompt, max_new_tokens=4, do_sample=False, verify_attention="split")
    with pytest.raises(GlideConfigError, match="verify_attention='fast'"):
        draft.generate(prompt, max_new_tokens=4, do_sample=False, verify_attention="fast")


def _varlen_reference(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, dropout, causal, debug, *, scale, seqused_k
):
    """What torch's varlen flash kernel computes (output, lse `[H, total_q]`), in plain torch, for the CPU."""
    groups = query.shape[1] // key.shape[1]
    output = torch.zeros_like(query)
    lse = torch.full((query.shape[1], query.shape[0]), float("inf"))  # the kernel's value for a sequence w/o keys
    for sequence in range(cu_seq_q.numel() - 1):
        q_start, q_end = int(cu_seq_q[sequence]), int(cu_seq_q[sequence + 1])
        k_start = int(cu_seq_k[sequence])
        used = int(seqused_k[sequence])
        assert q_end - q_start <= max_q and int(cu_seq_k[sequence + 1]) - k_start <= max_k and used <= max_k
        if used == 0:
            continue
        keys = key[k_start : k_start + used].repeat_interleave(groups, 1)  # [K, H, D]
        values = value[k_start : k_start + used].repeat_interleave(groups, 1)
        scores = torch.einsum("qhd,khd->hqk", query[q_start:q_end].float(), keys.float()) * scale
        lse[:, q_start:q_end] = torch.logsumexp(scores, -1)
        output[q_start:q_end] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), values.float())
    return output, lse, None, None, None


@pytest.mark.parametrize("slots", [7, 23, 40])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (6, 2), (3, 3), (4, 1)])
def test_chunked_prefix_for_the_flash_kernel_equals_the_reference(monkeypatch, slots, heads, kv_heads):
    """The split-KV chunking, the grouped query heads packed as rows of their key head, and the merge of the flash
    prefix path (kernel replaced by its plain-torch semantics), including chunks past a row's length and a last
    chunk shorter than the others."""
    from glide_hf import tree_attention

    monkeypatch.setattr(tree_attention, "_varlen_flash_forward", _varlen_reference)
    torch.manual_seed(slots)
    batch, queries, dim = 3, 3, 8
    keys = torch.randn(batch, slots, kv_heads, dim).transpose(1, 2)  # token-major storage, as the slot cache
    values = torch.randn(batch, slots, kv_heads, dim).transpose(1, 2)
    query = torch.randn(batch, heads, queries, dim)
    lengths = torch.tensor([1, slots // 2, slots])
    node_slots = torch.zeros(batch, queries, dtype=torch.long)  # unused by the prefix
    visible = torch.ones(batch, queries, queries, dtype=torch.bool)
    inputs = tree_attention.TreeAttentionInputs.build(lengths, node_slots, visible, slots, "flash", chunk_size=8)
    got, got_lse = tree_attention._merge([tree_attention._flash_prefix(query, keys, values, inputs, 0.3)])
    expected, expected_lse = tree_attention._reference_prefix(query, keys, values, lengths, 0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, expected_lse, atol=1e-5, rtol=1e-5)


def test_prefix_chunks_fill_the_gpu_without_chunks_shorter_than_the_minimum():
    """Split-KV sizing: one query per key head over a long prefix gets many chunks, 64 tree nodes (4 query heads per
    key head: 256 rows) fewer, and a short prefix one chunk of at least the minimum."""
    from glide_hf.tree_attention import PREFIX_MIN_CHUNK_SLOTS, prefix_chunk_slots

    cpu = torch.device("cpu")
    one_token = prefix_chunk_slots(16384, 1, 8, 4, cpu)
    tree = prefix_chunk_slots(16384, 1, 8, 256, cpu)
    assert PREFIX_MIN_CHUNK_SLOTS <= one_token < tree < 16384
    assert prefix_chunk_slots(1024, 1, 8, 256, cpu) >= PREFIX_MIN_CHUNK_SLOTS
    assert prefix_chunk_slots(16384, 64, 8, 256, cpu) == 16384  # a batch of 64 fills the GPU with one chunk
    # The Triton kernel's chunks are whole key tiles: 16472 slots (16k and room for new tokens) for 64 tree nodes.
    unaligned = prefix_chunk_slots(16472, 1, 8, 256, cpu, query_block=64)
    aligned = prefix_chunk_slots(16472, 1, 8, 256, cpu, query_block=64, slot_multiple=64)
    assert unaligned % 64 and aligned % 64 == 0 and unaligned < aligned < unaligned + 64


def test_fractional_forced_acceptance_alternates_to_the_requested_average():
    """Benchmark-only switch: 2.5 accepted drafts per round means rounds of 2 and 3, in that order."""
    target = build_target()
    draft = build_draft(target)
    out = draft.generate(
        random_ids(1, 6),
        max_new_tokens=40,
        do_sample=False,
        eos_token_id=None,
        num_draft_tokens=5,
        forced_acceptance=2.5,
        return_dict_in_generate=True,
    )
    accepted = [int(round_accepted[0]) for round_accepted in out.accepted_per_round]
    assert accepted[:6] == [2, 3, 2, 3, 2, 3]


def test_heuristic_schedule_adapts_the_chain_length_and_keeps_the_output(monkeypatch):
    """`num_draft_tokens_schedule="heuristic"`: the chain grows by 2 after a round in which a row accepted every
    draft and shrinks by 1 otherwise, within 1..num_draft_tokens; greedy output stays the target's."""
    from glide_hf import engine

    depths = []
    original_round = engine._round
    monkeypatch.setattr(
        engine, "_round", lambda call, *args: depths.append(call.policy.depth) or original_round(call, *args)
    )
    target = build_target()
    prompts = [random_ids(1, length, seed=length)[0] for length in (4, 9)]
    assert_rows_equal_single_generation(
        target,
        build_draft(target, sliding_window=5),
        prompts,
        30,
        num_draft_tokens=6,
        num_draft_tokens_schedule="heuristic",
    )
    for draft, expect_shrinking in ((build_draft(target), True), (build_agreeing_pair()[1], False)):
        depths.clear()
        out = draft.generate(
            random_ids(1, 6, seed=2),
            max_new_tokens=30,
            do_sample=False,
            num_draft_tokens=6,
            eos_token_id=None,
            num_draft_tokens_schedule="heuristic",
            return_dict_in_generate=True,
        )
        accepted = [int(a.max()) for a in out.accepted_per_round]
        expected = [6]
        for depth_accepted in accepted[:-1]:
            depth = expected[-1]
            expected.append(min(depth + 2, 6) if depth_accepted >= depth else max(depth - 1, 1))
        assert depths == expected
        assert (min(depths) < 6) == expect_shrinking  # a missing draft shortens the chain, an agreeing one does not


def test_heuristic_schedule_needs_a_chain_and_a_known_name():
    draft = build_draft(build_target())
    prompt = random_ids(1, 4)
    with pytest.raises(GlideConfigError, match="adapts a chain"):
        draft.generate(prompt, max_new_tokens=4, draft_strategy="tree", num_draft_tokens_schedule="heuristic")
    with pytest.raises(GlideConfigError, match="num_draft_tokens_schedule='linear'"):
        draft.generate(prompt, max_new_tokens=4, num_draft_tokens_schedule="linear")


@pytest.mark.parametrize("strategy", ["chain", "tree"])
def test_num_return_sequences_samples_each_prompt_from_the_target_distribution(strategy):
    """500 prompts x 8 samples each = the 4000 rows of the sampling test; the rows keep `target.generate`'s order."""
    target, draft, prompt, exact = _two_token_setup()
    torch.manual_seed(0)
    out = draft.generate(
        prompt.repeat(500, 1),
        max_new_tokens=2,
        do_sample=True,
        pad_token_id=0,
        num_return_sequences=8,
        **STRATEGIES[strategy],
    )
    assert out.shape == (4000, prompt.shape[1] + 2)
    assert _two_token_chi_square(out, exact) < CHI2_CRITICAL_63_DOF
    two_prompts = torch.tensor([[3, 4, 5, 6], [6, 5, 4, 3]])
    out = draft.generate(two_prompts, max_new_tokens=3, do_sample=True, pad_token_id=0, num_return_sequences=3)
    assert out.shape == (6, 7)
    assert torch.equal(out[:, :4], two_prompts.repeat_interleave(3, dim=0))


def test_num_return_sequences_with_greedy_decoding_is_rejected():
    """As by `target.generate`: Transformers' own generation-config check names the setting."""
    draft = build_draft(build_target())
    with pytest.raises(ValueError, match="num_return_sequences"):
        draft.generate(random_ids(1, 4), max_new_tokens=3, do_sample=False, num_return_sequences=2)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_repetition_penalty_runs_on_the_device_and_equals_the_targets(strategy, penalty, monkeypatch):
    """The repetition penalty alone takes no host path (so CUDA graphs stay on): each node's history is the row's
    seen tokens plus its own path; greedy output equals `target.generate`'s for a padded batch, with a small
    vocabulary so that repeats are frequent."""
    from glide_hf import engine

    monkeypatch.setattr(engine, "_process_with_histories", None)  # must not be called
    target = build_target(vocab_size=40)
    draft = build_draft(target, sliding_window=4)
    settings = dict(repetition_penalty=penalty, max_new_tokens=24, do_sample=False, eos_token_id=None)
    prompts = [random_ids(1, 6, seed=5)[0] % 40, random_ids(1, 2, seed=6)[0] % 40]
    ids, mask = left_pad(prompts)
    expected = target.generate(ids, attention_mask=mask, **settings)
    assert torch.equal(draft.generate(ids, attention_mask=mask, **settings, **STRATEGIES[strategy]), expected)


def test_device_repetition_penalty_equals_transformers_processor_per_node():
    """`apply_repetition_penalty` on a tree equals `RepetitionPenaltyLogitsProcessor` run on each node's history."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from glide_hf.engine import _path_tokens
    from glide_hf.sampling import apply_repetition_penalty
    from glide_hf.tree import DraftTree

    torch.manual_seed(0)
    vocab, history = 12, torch.tensor([[3, 5, 5, 7], [1, 2, 3, 4]])
    roots = history[:, -1]
    tree = DraftTree.start(roots, 5)
    tree.add_level(
        1,
        torch.zeros(2, 2, dtype=torch.long),
        torch.tensor([[5, 9], [9, 9]]),
        torch.zeros(2, 2),
        torch.ones(2, 2, dtype=torch.bool),
    )
    tree.add_level(
        3,
        torch.tensor([[1, 2], [1, 1]]),
        torch.tensor([[9, 0], [9, 4]]),
        torch.zeros(2, 2),
        torch.ones(2, 2, dtype=torch.bool),
    )
    logits = torch.randn(2, 5, vocab)
    seen = torch.zeros(2, vocab, dtype=torch.bool).scatter_(1, history, True)
    got = apply_repetition_penalty(logits, seen, _path_tokens(tree, roots, 2), 1.7)
    processor = RepetitionPenaltyLogitsProcessor(1.7)
    for row in range(2):
        for node in range(5):
            path = tree.tokens[row][tree.ancestors[row, node] & (tree.depths[row] > 0)]
            node_history = torch.cat([history[row], path])[None]
            expected = processor(node_history, logits[row, node][None].clone())[0]
            torch.testing.assert_close(got[row, node], expected)


@pytest.mark.parametrize("strategy", ["chain", "tree"])
def test_sampling_with_a_repetition_penalty_follows_the_penalised_target_distribution(strategy):
    """Chi-square over the first two tokens against the target's distribution with the penalty applied to each
    token's own history (`RepetitionPenaltyLogitsProcessor`), with the penalty on the device."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    target, draft, prompt, _ = _two_token_setup()
    processor = RepetitionPenaltyLogitsProcessor(2.0)
    vocab = 8
    with torch.no_grad():
        first = torch.softmax(processor(prompt, target(prompt).logits[:, -1]), -1)[0]
        extended = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)
        second = torch.softmax(processor(extended, target(extended).logits[:, -1]), -1)
    exact = first[:, None] * second
    torch.manual_seed(0)
    out = draft.generate(
        prompt.repeat(4000, 1),
        max_new_tokens=2,
        do_sample=True,
        pad_token_id=0,
        repetition_penalty=2.0,
        **STRATEGIES[strategy],
    )
    assert _two_token_chi_square(out, exact) < CHI2_CRITICAL_63_DOF


def test_the_rotary_table_holds_the_values_a_draft_step_would_compute():
    """Draft steps gather (cos, sin) from a table made once per call: it must hold exactly what the target's rotary
    embedding gives at each position, and it is not made for embeddings that rescale with the longest position."""
    from glide_hf.engine import _rotary_table

    target = build_target()
    draft = build_draft(target)
    cos, sin = _rotary_table(draft, target, 300, torch.device("cpu"))
    positions = torch.tensor([[0, 7, 150], [299, 3, 64]])
    like = torch.empty(1, 1, 1, dtype=draft.model.layer.input_layernorm.weight.dtype)
    expected_cos, expected_sin = target.model.rotary_emb(like, positions)
    assert torch.equal(cos[positions], expected_cos) and torch.equal(sin[positions], expected_sin)
    scaled = build_target(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert _rotary_table(build_draft(scaled), scaled, 300, torch.device("cpu")) is None
    prompt = random_ids(1, 12)
    settings = dict(max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert torch.equal(build_draft(scaled).generate(prompt, **settings), scaled.generate(prompt, **settings))


def test_the_warm_up_key_tells_apart_rounds_that_launch_other_kernels():
    """CUDA graph capture skips the eager warm-up round for a code path the draft has warmed (`_RoundRunner`); the
    key must separate sampling settings and strategies whose rounds launch other kernels, and nothing else."""
    from transformers import GenerationConfig

    from glide_hf.engine import _prefill, _round_code_path
    from glide_hf.tree import chain

    target = build_target()
    draft = build_draft(target)

    def key(prompt_length: int, **settings):
        config = GenerationConfig(max_new_tokens=8, **settings)
        prompt = random_ids(1, prompt_length)
        call, _, _ = _prefill(draft, target, chain(3), config, prompt, torch.ones_like(prompt), 8, [], None, None)
        hash(_round_code_path(call))
        return _round_code_path(call)

    greedy = key(10, do_sample=False)
    assert key(25, do_sample=False) == greedy  # another prompt length: other shapes, the same kernels
    sampled = key(10, do_sample=True, temperature=0.7)
    assert len({greedy, sampled, key(10, do_sample=True, temperature=0.7, top_p=0.9)}) == 3


def test_round_code_path_separates_dtypes_of_the_target_cache_and_of_the_draft():
    """A round warmed up for one dtype must not let another dtype's round be captured cold (Triton and cuBLAS pick
    kernels per dtype): the warm-up key names both."""
    from transformers import GenerationConfig

    from glide_hf.engine import _prefill, _round_code_path
    from glide_hf.tree import chain

    target = build_target()
    draft = build_draft(target)
    prompt = random_ids(1, 6)
    config = GenerationConfig(do_sample=False, max_new_tokens=4)

    def code_path():
        call, _, _ = _prefill(draft, target, chain(2), config, prompt, torch.ones_like(prompt), 8, [], None, None)
        return _round_code_path(call)

    float32 = code_path()
    draft.get_glide_model().layer.to(torch.bfloat16)
    draft_bfloat16 = code_path()
    target.to(torch.bfloat16)
    both_bfloat16 = code_path()
    assert len({float32, draft_bfloat16, both_bfloat16}) == 3
    assert torch.float32 in float32 and torch.bfloat16 in draft_bfloat16


def test_triton_kernels_are_launched_with_the_shapes_of_the_coming_round(monkeypatch):
    """Before a capture the engine launches its Triton kernels once with the round's sizes (CUDA only; here the
    launches are checked for their shapes and run by reference code): the split verify attention where the call
    splits with Triton, and the draft's cross-attention, inside `fused_for_inference`, once per width a draft step
    feeds (2 at the root, then each tree level's)."""
    from transformers import GenerationConfig

    from glide_hf import engine
    from glide_hf.tree import static_tree
    from glide_hf.tree_attention import tree_attention_forward

    target = build_target()
    draft = build_draft(target)
    prompt = random_ids(2, 7)
    config = GenerationConfig(do_sample=False, max_new_tokens=4)
    mask = torch.ones_like(prompt)
    policy = static_tree((3, 4, 6))  # the draft feeds 2 tokens at the root, then the 3 and 4 nodes of two levels
    call, rows, _ = engine._prefill(draft, target, policy, config, prompt, mask, 8, [], None, None)
    seen, widths = [], []

    def reference(module, query, key, value, mask, glide_tree):
        assert glide_tree.kernel == "triton" and glide_tree.num_slots == call.target_cache.num_slots
        assert query.shape == (2, target.config.num_attention_heads, policy.num_nodes, key.shape[-1])
        glide_tree.kernel = "torch"
        seen.append(tree_attention_forward(module, query, key, value, mask, glide_tree=glide_tree)[0])
        return seen[-1], None

    def cross_attention(query, keys, values, lengths, scale):
        assert keys.shape == call.target_cache.layers[0].keys.shape and torch.equal(lengths, rows.lengths)
        widths.append(query.shape[2])

    monkeypatch.setattr(engine, "tree_attention_forward", reference)
    monkeypatch.setattr(engine, "prefix_attention", cross_attention)
    monkeypatch.setattr(engine, "prefix_attention_serves", lambda keys: True)
    engine._compile_triton_kernels(call, rows)
    assert not seen and not widths  # the call does not verify split; the draft is not in `fused_for_inference`
    call.split_verify, call.split_kernel = True, "triton"
    with draft.fused_for_inference():
        engine._compile_triton_kernels(call, rows)
    assert len(seen) == 1 and seen[0].shape == (2, policy.num_nodes, target.config.num_attention_heads, 16)
    assert widths == [2, 3, 4]


def test_a_split_kernel_that_does_not_serve_the_target_is_refused():
    target = build_target()
    draft = build_draft(target)
    prompt = random_ids(1, 5)
    settings = dict(max_new_tokens=3, do_sample=False, verify_attention="split")
    for kernel, needs in (("flash", "needs a CUDA target"), ("triton", "needs Triton installed")):
        with pytest.raises(UnsupportedGenerationError, match=f"{needs}.*split_kernel='auto'"):
            draft.generate(prompt, split_kernel=kernel, **settings)
    with pytest.raises(GlideConfigError, match="is not one of 'auto', 'triton', 'flash' or 'torch'"):
        draft.generate(prompt, split_kernel="fast", **settings)
    assert draft.generate(prompt, split_kernel="torch", **settings).shape == (1, 8)


def test_calls_that_reuse_the_kept_buffers_equal_the_target(monkeypatch):
    """With CUDA graphs a call writes its state into the buffers an earlier call with the same signature left
    (`_KeptRound`), stale values included. Here every call shares one kept round, eagerly (no GPU): other prompts,
    other padding, the draft's own vocabulary and a repetition penalty; each output stays the target's."""
    from glide_hf import engine

    kept = engine._KeptRound(("shared",))
    monkeypatch.setattr(engine, "_kept_round", lambda draft, signature: contextlib.nullcontext(kept))
    target = build_target()
    draft = build_draft(target, sliding_window=4)
    draft.set_draft_vocabulary(range(VOCAB // 2, VOCAB))
    settings = dict(max_new_tokens=14, do_sample=False, eos_token_id=None, repetition_penalty=1.2)
    buffers = None
    for seed in range(3):
        lengths = (9, 9 - 2 * seed)
        prompts = [random_ids(1, length, seed=seed * 10 + row)[0] for row, length in enumerate(lengths)]
        ids, mask = left_pad(prompts)
        out = draft.generate(ids, attention_mask=mask, **settings, **STRATEGIES["tree"])
        for row, prompt in enumerate(prompts):
            expected = target.generate(prompt[None], **settings)[0, prompt.shape[0] :]
            assert torch.equal(out[row, ids.shape[1] :], expected), (seed, row)
        current = {name: tensor.data_ptr() for name, tensor in kept.tensors.items()}
        assert buffers is None or current == buffers  # the same storage every call
        buffers = current
    assert {"lengths", "output", "seen", "draft_head_weight", "rotary_cos"} <= set(buffers)


def test_a_call_that_finds_the_kept_round_in_use_gets_buffers_of_its_own():
    """Two calls at once on one draft (threads, or a streamer that generates) must not share buffers: the second
    gets its own, kept by no one; another signature replaces the kept round."""
    from glide_hf.engine import _kept_round, engine_state

    draft = build_draft(build_target())
    with _kept_round(draft, ("a",)) as first:
        assert engine_state(draft).kept_round is first and first.lock.locked()
        with _kept_round(draft, ("a",)) as nested:
            assert nested is not first and nested.signature is None
        assert engine_state(draft).kept_round is first
    with _kept_round(draft, ("a",)) as again:
        assert again is first
    with _kept_round(draft, ("b",)) as other:
        assert other is not first and engine_state(draft).kept_round is other
    with _kept_round(draft, None) as eager:
        assert eager.signature is None and engine_state(draft).kept_round is other
    assert not other.lock.locked()


def test_a_kept_buffer_of_another_shape_is_refused():
    from glide_hf import CacheStateError
    from glide_hf.engine import _KeptRound

    kept = _KeptRound(("signature",))
    first = torch.zeros(3)
    assert kept.take("lengths", first) is first
    assert kept.take("lengths", torch.ones(3)) is first and first.sum() == 3
    with pytest.raises(CacheStateError, match="release_cuda_graphs"):
        kept.take("lengths", torch.zeros(4))


def test_copies_of_a_draft_start_without_the_engines_kept_state():
    """CUDA graphs cannot be copied or pickled: `copy.deepcopy` and pickling give a draft with an empty state."""
    import copy
    import pickle

    from glide_hf.engine import _KeptRound, engine_state

    draft = build_draft(build_target())
    state = engine_state(draft)
    state.kept_round, state.warm_code_paths = _KeptRound(("signature",)), {"path"}
    for copied in (copy.deepcopy(draft), pickle.loads(pickle.dumps(draft))):
        assert engine_state(copied).kept_round is None and not engine_state(copied).warm_code_paths
    assert engine_state(draft).kept_round is state.kept_round
    draft.release_cuda_graphs()
    assert engine_state(draft).kept_round is None


@pytest.mark.parametrize("pad_token_id", [0, None])
def test_left_padded_prompts_without_a_mask_are_read_as_target_generate_reads_them(pad_token_id):
    """Without `attention_mask`, padding is told from `pad_token_id` as `target.generate` tells it (and not at all
    without one): the output is the target's either way."""
    target = build_target()
    draft = build_draft(target)
    ids, _ = left_pad([random_ids(1, length, seed=length)[0].clamp(min=1) for length in (4, 11)], pad=0)
    settings = dict(max_new_tokens=12, do_sample=False, eos_token_id=1, pad_token_id=pad_token_id)
    expected = target.generate(ids, **settings)
    assert torch.equal(draft.generate(ids, **settings), expected)
    if pad_token_id is not None:  # padding was read as padding: the short row equals its own generation
        short = ids[:1, ids.shape[1] - 4 :]
        assert torch.equal(expected[0, ids.shape[1] :], target.generate(short, **settings)[0, 4:])


@pytest.mark.parametrize(
    "settings",
    [
        dict(),  # Transformers' default: 20 new tokens (not a total length of 20)
        dict(max_length=15),
        dict(max_new_tokens=30, forced_eos_token_id=17),  # forced at the last position of prompt + 30
    ],
    ids=["default_length", "max_length", "forced_eos"],
)
def test_generated_length_and_forced_eos_are_those_of_target_generate(settings):
    target = build_target()
    draft = build_draft(target)
    prompt = random_ids(1, 8, seed=1)
    expected = target.generate(prompt, do_sample=False, eos_token_id=None, **settings)
    assert torch.equal(draft.generate(prompt, do_sample=False, eos_token_id=None, **settings), expected)


class RecordingStreamer:
    """Keeps every tensor `generate` streams, then "end"."""

    def __init__(self) -> None:
        self.puts = []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.puts.append("end")


class StopOnToken(StoppingCriteria):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_stopping_criteria_and_the_streamer_see_what_target_generate_shows_them():
    """A draft that agrees with its target accepts many tokens per round: a criterion that fires in the middle of a
    round (on the last token, or on the length) stops its row there, rows behind the others are checked on their own
    sequence, and the streamer gets the prompt, then one `[batch]` tensor per step (padding for finished rows)."""
    from test_assisted import build_agreeing_pair
    from transformers.generation.stopping_criteria import MaxLengthCriteria

    target, draft = build_agreeing_pair()
    ids, mask = left_pad([random_ids(1, length, seed=length)[0] for length in (6, 9, 4)])
    free = target.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None)
    unused = next(token for token in range(VOCAB) if token not in free)
    settings = dict(max_new_tokens=24, do_sample=False, eos_token_id=unused, pad_token_id=0)
    stop_token = int(free[0, ids.shape[1] + 6])  # row 0's seventh new token
    for criterion in (StopOnToken(stop_token), MaxLengthCriteria(ids.shape[1] + 7)):
        runs = []
        for model in (target, draft):
            streamer = RecordingStreamer()
            out = model.generate(
                ids, attention_mask=mask, stopping_criteria=[criterion], streamer=streamer, **settings
            )
            runs.append((out, streamer.puts))
        (expected, expected_puts), (got, got_puts) = runs
        assert torch.equal(got, expected), (criterion, got, expected)
        assert draft.generate(ids, attention_mask=mask, stopping_criteria=[criterion], **settings).shape[1] < (
            ids.shape[1] + 24
        )
        assert len(got_puts) == len(expected_puts)
        assert got_puts[-1] == "end" and all(
            torch.equal(mine, theirs) for mine, theirs in zip(got_puts[:-1], expected_puts[:-1])
        )


@pytest.mark.parametrize(
    "settings",
    [dict(encoder_repetition_penalty=3.0), dict(encoder_no_repeat_ngram_size=2)],
    ids=["encoder_repetition_penalty", "encoder_no_repeat_ngram_size"],
)
def test_prompt_based_penalties_are_applied_as_target_generate_applies_them(settings):
    """For a decoder-only target Transformers treats the prompt as the "encoder input" of these two settings."""
    target = build_target()
    draft = build_draft(target)
    ids, mask = left_pad([random_ids(1, length, seed=length)[0] for length in (9, 5)])
    expected = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **settings)
    assert torch.equal(
        draft.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **settings), expected
    )


@pytest.mark.parametrize(
    "settings, error",
    [
        (dict(penalty_alpha=0.6, top_k=4), UnsupportedGenerationError),
        (dict(dola_layers="high"), UnsupportedGenerationError),
        (dict(token_healing=True), UnsupportedGenerationError),
        (dict(synced_gpus=True), UnsupportedGenerationError),
        (dict(forced_acceptance="2"), GlideConfigError),
    ],
    ids=["contrastive", "dola", "token_healing", "synced_gpus", "forced_acceptance_type"],
)
def test_decoding_methods_the_engine_does_not_implement_are_refused(settings, error):
    draft = build_draft(build_target())
    with pytest.raises(error):
        draft.generate(random_ids(1, 5), max_new_tokens=4, **settings)


def test_synced_gpus_false_is_accepted():
    target = build_target()
    prompt = random_ids(1, 5)
    out = build_draft(target).generate(prompt, max_new_tokens=6, do_sample=False, synced_gpus=False)
    assert torch.equal(out, target.generate(prompt, max_new_tokens=6, do_sample=False))


def test_the_repetition_penalty_counts_prompt_tokens_as_target_generate_does():
    """Transformers skips a row's leading padding only: a masked token inside the prompt still counts as seen."""
    target = build_target()
    draft = build_draft(target)
    prompt = random_ids(1, 8, seed=11)
    following = target.generate(prompt, max_new_tokens=1, do_sample=False)[:, -1:]
    ids = torch.cat([prompt[:, :3], following, prompt[:, 3:]], dim=1)
    ids = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], dim=1)  # and two tokens of leading padding
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[0, 5] = 0  # the token the target would say next, masked inside the prompt
    settings = dict(max_new_tokens=8, do_sample=False, repetition_penalty=3.0, eos_token_id=None)
    expected = target.generate(ids, attention_mask=mask, **settings)
    assert torch.equal(draft.generate(ids, attention_mask=mask, **settings), expected)


def test_right_padded_prompts_get_a_warning(caplog):
    import logging

    draft = build_draft(build_target())
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    logging.Logger.warning_once.cache_clear()  # Transformers' once-only warnings: this one again, whatever ran before
    with caplog.at_level(logging.WARNING, logger="glide_hf"):
        draft.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert "Right padding in the prompts" in caplog.text
