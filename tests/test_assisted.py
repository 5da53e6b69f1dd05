"""Stock Transformers assisted decoding: `target.generate(..., assistant_model=draft)`."""

import pytest
import torch
from test_modeling import VOCAB, build_draft, build_target, random_ids
from transformers import GenerationConfig

from glide_hf import UnsupportedGenerationError


def count_target_forwards(target):
    calls = []
    handle = target.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("prompt_length", [3, 8, 25])
def test_greedy_assisted_output_equals_target_output(family, prompt_length):
    target = build_target(family)
    draft = build_draft(target, sliding_window=8)
    for seed in range(3):
        prompt = random_ids(1, prompt_length, seed=seed)
        expected = target.generate(prompt, max_new_tokens=24, do_sample=False)
        assisted = target.generate(prompt, assistant_model=draft, max_new_tokens=24, do_sample=False)
        assert torch.equal(expected, assisted)


def build_agreeing_pair():
    """Train-free `(target, draft)` that always agree: a one-layer target whose logits depend on the current token
    only (a bigram model), and a draft whose layer adds nothing, so its LM head reads the current token's embedding
    through the target's final norm, as the target's does."""
    target = build_target(num_hidden_layers=1)
    with torch.no_grad():
        for layer in target.model.layers:  # the target becomes a bigram model: output = f(current token)
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    draft = build_draft(target, sliding_window=4)
    with torch.no_grad():
        for module in (
            draft.model.layer.self_attn.o_proj,
            draft.model.layer.cross_attn.o_proj,
            draft.model.layer.mlp.down_proj,
        ):
            module.weight.zero_()
        draft.model.norm.weight.copy_(target.model.norm.weight)
    return target, draft


def test_greedy_output_is_identical_for_a_draft_that_agrees_with_the_target():
    """A draft whose LM head input is the target's own prediction accepts many tokens per round; the output must
    still be identical."""
    target, draft = build_agreeing_pair()
    prompt = random_ids(1, 6)
    calls, handle = count_target_forwards(target)
    assisted = target.generate(prompt, assistant_model=draft, max_new_tokens=30, do_sample=False)
    handle.remove()
    assert torch.equal(assisted, target.generate(prompt, max_new_tokens=30, do_sample=False))
    assert 30 / len(calls) > 3  # every drafted token accepted: 1 + num_draft_tokens per round after round 0


def test_generation_crossing_the_sliding_window_many_times_is_exact():
    target = build_target()
    draft = build_draft(target, sliding_window=3)
    prompt = random_ids(1, 40)
    expected = target.generate(prompt, max_new_tokens=60, do_sample=False)
    assert torch.equal(expected, target.generate(prompt, assistant_model=draft, max_new_tokens=60, do_sample=False))


def test_trained_looking_draft_with_eos_stops_where_the_target_stops():
    target = build_target()
    draft = build_draft(target)
    prompt = random_ids(1, 5)
    free = target.generate(prompt, max_new_tokens=20, do_sample=False)
    eos = int(free[0, 12])  # a token the target produces mid-way becomes the end-of-sequence token
    expected = target.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=eos)
    assisted = target.generate(prompt, assistant_model=draft, max_new_tokens=20, do_sample=False, eos_token_id=eos)
    assert torch.equal(expected, assisted)
    assert expected.shape[1] < free.shape[1]


@pytest.mark.parametrize("sampling", [dict(temperature=0.7), dict(top_k=20), dict(top_p=0.9, temperature=1.3)])
def test_sampling_with_the_draft_produces_valid_tokens(sampling):
    target = build_target()
    draft = build_draft(target)
    torch.manual_seed(0)
    out = target.generate(random_ids(1, 6), assistant_model=draft, max_new_tokens=20, do_sample=True, **sampling)
    assert out.shape == (1, 26)
    assert ((out >= 0) & (out < VOCAB)).all()


# Chi-square critical value for 63 degrees of freedom (64 cells) at alpha = 0.001 (Wilson-Hilferty: 103.5).
CHI2_CRITICAL_63_DOF = 103.5


def test_sampling_with_the_draft_follows_the_target_distribution():
    """The first two sampled tokens with the draft follow the target's exact two-token distribution (speculative
    sampling keeps it): a chi-square test over 64 cells, 600 draws. Negative control: the same counts are
    rejected against the draft's own distribution, so a sampler that returned draft tokens unchecked would fail."""
    vocab, draws = 8, 600
    target = build_target(vocab_size=vocab, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    with torch.no_grad():
        target.lm_head.weight.mul_(3)  # sharper distributions: the target and the draft differ clearly
    draft = build_draft(target)
    prompt = torch.tensor([[3, 4, 5, 6]])

    def two_token_distribution(model):
        with torch.no_grad():
            first = torch.softmax(model(prompt).logits[0, -1], -1)
            extended = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)
            second = torch.softmax(model(extended).logits[:, -1], -1)
        return first[:, None] * second  # [first token, second token]

    counts = torch.zeros(vocab, vocab)
    torch.manual_seed(0)
    for _ in range(draws):
        out = target.generate(prompt, assistant_model=draft, max_new_tokens=2, do_sample=True, pad_token_id=0)
        counts[out[0, -2], out[0, -1]] += 1

    def chi_square(expected_probabilities):
        expected = draws * expected_probabilities
        return ((counts - expected) ** 2 / expected).sum().item()

    assert chi_square(two_token_distribution(target)) < CHI2_CRITICAL_63_DOF
    assert chi_square(two_token_distribution(draft)) > CHI2_CRITICAL_63_DOF


def test_second_call_does_not_read_the_first_calls_cache():
    """Regression: a recorded target cache from an earlier call must not reach the first round of the next call."""
    target = build_target()
    draft = build_draft(target)
    seen = []
    original = draft.model.forward

    def spy(*args, **kwargs):
        cache = kwargs.get("target_cache")
        seen.append(None if cache is None else cache.get_seq_length())
        return original(*args, **kwargs)

    draft.model.forward = spy
    first, second = random_ids(1, 12, seed=1), random_ids(1, 5, seed=2)
    target.generate(first, assistant_model=draft, max_new_tokens=8, do_sample=False)
    seen.clear()
    out = target.generate(second, assistant_model=draft, max_new_tokens=8, do_sample=False)
    assert seen[0] == 0  # first forward of the second call: no target context at all
    assert all(length is None or length <= out.shape[1] for length in seen)
    assert torch.equal(out, target.generate(second, max_new_tokens=8, do_sample=False))


def test_unrelated_target_call_between_generations_is_not_read():
    target = build_target()
    draft = build_draft(target)
    target(random_ids(1, 30), use_cache=True)  # an unrelated forward with its own cache
    prompt = random_ids(1, 7)
    assert draft.model.recorded_target_cache(prompt.shape[1] - 1) is None
    expected = target.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(expected, target.generate(prompt, assistant_model=draft, max_new_tokens=10, do_sample=False))


def test_draft_ships_assisted_decoding_defaults():
    draft = build_draft(build_target(), num_draft_tokens=4)
    assert draft.generation_config.num_assistant_tokens == 4
    assert draft.generation_config.num_assistant_tokens_schedule == "constant"
    assert draft.generation_config.assistant_confidence_threshold == 0.0


def test_draft_tokens_per_round_follow_the_generation_config():
    target = build_target()
    draft = build_draft(target, num_draft_tokens=3)
    lengths = []
    handle = target.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    target.generate(random_ids(1, 6), assistant_model=draft, max_new_tokens=12, do_sample=False)
    handle.remove()
    # round 0: prompt + 1 draft token (no target context yet); later rounds: 1 new token + 3 drafts
    assert lengths[0] == 7
    assert lengths[1:4] == [4, 4, 4]  # the last rounds draft fewer tokens only to stay within max_new_tokens


def test_batch_larger_than_one_on_the_stock_path_raises():
    target = build_target()
    draft = build_draft(target)
    with pytest.raises(ValueError, match="batch"):
        target.generate(random_ids(2, 5), assistant_model=draft, max_new_tokens=4, do_sample=False)


def test_draft_generate_called_directly_decodes_with_the_target():
    target = build_target()
    draft = build_draft(target)
    prompt = random_ids(1, 4)
    expected = target.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(draft.generate(prompt, max_new_tokens=6, do_sample=False), expected)


def test_draft_generate_as_assistant_with_a_batch_points_to_the_engine():
    draft = build_draft(build_target())
    config = GenerationConfig(max_new_tokens=3, is_assistant=True)
    with pytest.raises(UnsupportedGenerationError, match=r"batch size 1 only.*draft\.generate"):
        draft.generate(input_ids=random_ids(2, 4), generation_config=config)


def test_a_second_copy_of_the_target_calling_generate_is_named_in_the_warning(caplog):
    """The draft's own target never runs when another model (a second copy of the target) calls `generate`: outputs
    stay that model's, and the warning says what happened and what to do."""
    import copy
    import logging

    target = build_target()
    draft = build_draft(target)
    other_copy = copy.deepcopy(target)
    logging.Logger.warning_once.cache_clear()  # Transformers' once-only warnings: this one again, whatever ran before
    prompt = random_ids(1, 10)
    settings = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    with caplog.at_level(logging.WARNING, logger="glide_hf"):
        out = other_copy.generate(prompt, assistant_model=draft, **settings)
    assert torch.equal(out, other_copy.generate(prompt, **settings))
    assert "attached target (`draft.target`) has not run during this `generate` call" in caplog.text
