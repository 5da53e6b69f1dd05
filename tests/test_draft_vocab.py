"""A draft vocabulary: the engine drafts over a subset of token ids and stays lossless; choosing, saving and
loading the subset; `glide-hf draft-vocab`."""

import json

import pytest
import torch
from safetensors import safe_open
from test_assisted import CHI2_CRITICAL_63_DOF
from test_engine import STRATEGIES, _two_token_chi_square, _two_token_setup, assert_rows_equal_single_generation
from test_modeling import VOCAB, build_draft, build_target, random_ids

from glide_hf import GlideConfigError, GlideForCausalLM
from glide_hf.cli import main as cli_main
from glide_hf.draft_vocab import count_tokens, most_frequent_token_ids
from glide_hf.engine import _draft_head


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_greedy_output_is_the_targets_with_a_small_draft_vocabulary(strategy):
    """Most of the target's tokens lie outside the 40 draftable ids: the target still produces them."""
    target = build_target()
    draft = build_draft(target, sliding_window=5).set_draft_vocabulary(range(0, VOCAB, VOCAB // 40))
    prompts = [random_ids(1, length, seed=length)[0] for length in (3, 12)]
    assert_rows_equal_single_generation(target, draft, prompts, 20, **STRATEGIES[strategy])
    ids, weight, _ = _draft_head(draft)
    assert torch.equal(ids, torch.arange(0, VOCAB, VOCAB // 40))
    assert torch.equal(weight, target.lm_head.weight[ids])  # the draft reads 40 rows of the head, not 300


def test_drafts_come_from_the_draft_vocabulary():
    """A draft that only knows one token proposes it every time: acceptance falls, output does not change."""
    target = build_target()
    prompt = random_ids(1, 10, seed=3)
    full = build_draft(target).generate(prompt, max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    one = build_draft(target).set_draft_vocabulary([7])
    restricted = one.generate(prompt, max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(full.sequences, restricted.sequences)
    expected_sevens = int((restricted.sequences[0, 10:] == 7).sum())
    assert sum(int(a.sum()) for a in restricted.accepted_per_round) <= expected_sevens


@pytest.mark.parametrize("strategy", ["chain", "tree"])
def test_sampling_with_a_draft_vocabulary_follows_the_target_distribution(strategy):
    target, draft, prompt, exact = _two_token_setup()
    draft.set_draft_vocabulary([0, 2, 3, 5, 7])
    torch.manual_seed(0)
    out = draft.generate(
        prompt.repeat(4000, 1), max_new_tokens=2, do_sample=True, pad_token_id=0, **STRATEGIES[strategy]
    )
    assert _two_token_chi_square(out, exact) < CHI2_CRITICAL_63_DOF


def test_the_draft_vocabulary_is_saved_and_loaded(tmp_path):
    target = build_target()
    draft = build_draft(target).set_draft_vocabulary([5, 1, 9, 200])
    draft.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["draft_vocab_size"] == 4
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        assert handle.get_tensor("draft_vocab_ids").tolist() == [1, 5, 9, 200]
        assert not any(name.startswith("model.target") for name in handle.keys())
    loaded = GlideForCausalLM.from_pretrained(tmp_path, target_model=target)
    assert loaded.draft_vocab_ids.tolist() == [1, 5, 9, 200]
    prompt = random_ids(1, 8, seed=1)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=12), draft.generate(prompt, max_new_tokens=12))
    loaded.set_draft_vocabulary(None)
    assert loaded.draft_vocab_ids is None and loaded.config.draft_vocab_size is None


@pytest.mark.parametrize(
    ("token_ids", "message"),
    [
        ([], "is empty"),
        (torch.tensor([], dtype=torch.long), "non-empty"),
        ([[1, 2]], "1-D"),
        ([1.5], "integer"),
        ([3, 3], "repeated"),
        ([VOCAB], "must lie in"),
    ],
)
def test_bad_draft_vocabularies_are_rejected(token_ids, message):
    draft = build_draft(build_target())
    with pytest.raises(GlideConfigError, match=message):
        draft.set_draft_vocabulary(token_ids)


def test_any_iterable_of_ids_sets_the_draft_vocabulary():
    draft = build_draft(build_target())
    for token_ids in ({9, 1, 5}, range(1, 10, 4), (i for i in (5, 1, 9))):
        assert draft.set_draft_vocabulary(token_ids).draft_vocab_ids.tolist() == [1, 5, 9]


def test_a_tree_wider_than_the_draft_vocabulary_is_rejected():
    draft = build_draft(build_target()).set_draft_vocabulary([1, 2, 3])
    with pytest.raises(GlideConfigError, match="vocabulary of 3"):
        draft.generate(random_ids(1, 4), max_new_tokens=4, draft_strategy="tree", tree_widths=(4, 4))


def test_cape_bins_larger_than_the_draft_vocabulary_are_rejected():
    draft = build_draft(build_target()).set_draft_vocabulary([1, 2, 3])
    with pytest.raises(GlideConfigError, match="cape_bins"):
        draft.generate(random_ids(1, 4), max_new_tokens=4, draft_strategy="cape", num_draft_tokens=2)


def test_config_rejects_a_draft_vocab_size_beyond_the_vocabulary():
    with pytest.raises(GlideConfigError, match="draft_vocab_size"):
        build_draft(build_target(), draft_vocab_size=VOCAB + 1)


def test_most_frequent_token_ids_count_and_rank():
    counts = count_tokens([[3, 3, 3, 1, -100], [1, 4, 4, 4, 4], []], vocab_size=6)
    assert counts.tolist() == [0, 2, 0, 3, 4, 0]
    assert most_frequent_token_ids(counts, 2).tolist() == [3, 4]
    assert most_frequent_token_ids(counts, 3, always_include=[5]).tolist() == [3, 4, 5]
    assert most_frequent_token_ids(counts, 4).tolist() == [0, 1, 3, 4]  # ties: the lower id first
    with pytest.raises(GlideConfigError, match="outside the vocabulary"):
        count_tokens([[6]], vocab_size=6)
    with pytest.raises(GlideConfigError, match="size must be in"):
        most_frequent_token_ids(counts, 0)


def test_draft_vocab_command_saves_the_most_frequent_tokens(target_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    draft = GlideForCausalLM.from_target(AutoModelForCausalLM.from_pretrained(target_dir), sliding_window=4)
    draft.save_pretrained(tmp_path / "draft")
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    specials = set(tokenizer.all_special_ids)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": "aaaa bbbbbb c"}) for _ in range(3)) + "\n")
    size = len(specials) + 2  # the special tokens, then the two most frequent characters
    status = cli_main(
        [
            "draft-vocab",
            "--draft",
            str(tmp_path / "draft"),
            "--data",
            str(data),
            "--size",
            str(size),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert status == 0
    assert "covering" in capsys.readouterr().out
    loaded = GlideForCausalLM.from_pretrained(tmp_path / "out", target_kwargs={"device_map": "meta"})
    a, b = (tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in ("a", "b"))
    assert set(loaded.draft_vocab_ids.tolist()) == specials | {a, b}  # 'b' x6 and 'a' x4 beat ' ' x2 and 'c' x1
    assert loaded.config.draft_vocab_size == size


@pytest.mark.parametrize("spelling", ["dashes", "underscores"])
def test_draft_vocab_flags_of_two_words_take_dashes_or_underscores(spelling):
    # New-user audit: draft-vocab refused `--max_length`, which train, bench and distill-data accept.
    from glide_hf.draft_vocab import _build_parser

    flags = ["--data-format", "text", "--max-length", "16"]
    if spelling == "underscores":
        flags = ["--" + flag[2:].replace("-", "_") if flag.startswith("--") else flag for flag in flags]
    required = ["--draft", "d", "--data", "x.jsonl", "--size", "8", "--output", "o"]
    args = _build_parser("glide-hf draft-vocab").parse_args([*required, *flags])
    assert args.data_format == "text" and args.max_length == 16
