"""The acceptance rule on its own: exact distribution tests at a size that catches a 2% shift (Cohen's w = 0.02).

Synthetic target conditionals over an 8-token vocabulary define the exact joint distribution of the first two
tokens; trees are built from a different synthetic draft the way the engine builds them (deterministic top-k
children), and `verify_tree` runs on 200 000 copies at once. A chi-square test over the cells the target can
produce (64 when no warper truncates the vocabulary) at alpha = 0.001 has power above 0.9 against w = 0.02 at this
size (noncentrality 200 000 * 0.02^2 = 80). Controls: the same test rejects draws with a 2% shift and a sampler that
accepts children by the ratio p / q (the rule for children drawn from q, biased for top-k children); the
engine-level control that trusts the draft is in test_engine.py.
"""

import pytest
import torch
from transformers import GenerationConfig

from glide_hf.sampling import build_warpers, verify_sampled_chain, verify_tree
from glide_hf.tree import DraftTree, TreePolicy

VOCAB = 8
DRAWS = 200_000


def conditionals(seed: int):
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(VOCAB, generator=generator) * 1.5
    second = torch.randn(VOCAB, VOCAB, generator=generator) * 1.5  # [first token, second token]
    return first, second


def build_tree(policy: TreePolicy, draft_first: torch.Tensor, draft_second: torch.Tensor, batch: int) -> DraftTree:
    """The engine's tree growth on synthetic draft logits: level 1 from the root, level 2 from the fed nodes."""
    tree = DraftTree.start(torch.zeros(batch, dtype=torch.long), policy.num_nodes)
    logprobs = torch.log_softmax(draft_first, -1)[None, None].expand(batch, 1, VOCAB)
    fed = torch.zeros(batch, 1, dtype=torch.long)
    for level in (1, 2):
        parent_local, tokens, scores, valid = policy.select(level, logprobs, tree.scores.gather(1, fed))
        start = policy.level_start(level)
        tree.add_level(start, fed.gather(1, parent_local), tokens, scores, valid)
        width = policy.expand[level - 1]
        fed = torch.arange(start, start + width)[None].expand(batch, -1)
        logprobs = torch.log_softmax(draft_second[tokens[:, :width]], -1)
    return tree


def target_logits_at_nodes(tree: DraftTree, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The target's logits after each node: the root predicts the first token, a depth-1 node the second."""
    batch, nodes = tree.tokens.shape
    logits = first[None, None].expand(batch, nodes, VOCAB).clone()
    depth_one = tree.depths == 1
    logits[depth_one] = second[tree.tokens[depth_one]]
    return logits


def first_two_tokens(tree: DraftTree, verdict, second: torch.Tensor, warpers) -> torch.Tensor:
    """The round's first two emitted tokens; where the round emitted one token only, the second is what the next
    round's root draw would be (a plain draw from the processed target conditional)."""
    path_tokens = tree.tokens.gather(1, verdict.path)
    emitted = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], dim=1)
    emitted.scatter_(1, verdict.num_accepted[:, None], verdict.next_token[:, None])
    one_token = verdict.num_accepted == 0
    next_logits = warpers(None, second[emitted[one_token, 0]].clone())
    emitted[one_token, 1] = torch.multinomial(torch.softmax(next_logits, -1), 1)[:, 0]
    return emitted[:, :2]


def chi_square_critical(degrees_of_freedom: int, z: float = 3.09) -> float:
    """Chi-square critical value at alpha = 0.001 (z = 3.09), Wilson-Hilferty approximation."""
    k = degrees_of_freedom
    return k * (1 - 2 / (9 * k) + z * (2 / (9 * k)) ** 0.5) ** 3


def chi_square_excess(pairs: torch.Tensor, joint: torch.Tensor) -> float:
    """Chi-square statistic over the cells the target can produce, minus its critical value (> 0: reject).
    A draw in a cell of probability zero (outside top-k / top-p) rejects outright."""
    counts = torch.zeros(VOCAB, VOCAB)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(pairs.shape[0]), accumulate=True)
    possible = joint > 0
    if counts[~possible].sum() > 0:
        return float("inf")
    expected = pairs.shape[0] * joint[possible]
    statistic = float(((counts[possible] - expected) ** 2 / expected).sum())
    return statistic - chi_square_critical(int(possible.sum()) - 1)


def processed_joint(first, second, config: GenerationConfig) -> torch.Tensor:
    warpers = build_warpers(config)
    p_first = torch.softmax(warpers(None, first[None].clone())[0], -1)
    p_second = torch.softmax(warpers(None, second.clone()), -1)
    return p_first[:, None] * p_second


POLICIES = {
    "chain": TreePolicy("chain", (1, 1), (1, 1)),
    "tree": TreePolicy("static", (3, 4), (3, 4)),
    "cape": TreePolicy("cape", (4, 4), (1, 1), cape_bins=(4, 4, 4, 3, 3, 3, 2, 2, 1, 1, 1)),
}
SETTINGS = {
    "plain": GenerationConfig(do_sample=True, top_k=0),
    "temperature_top_k": GenerationConfig(do_sample=True, temperature=0.7, top_k=5),
    "top_p": GenerationConfig(do_sample=True, top_p=0.8, top_k=0),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_accepted_tokens_follow_the_target_distribution(policy, setting):
    first, second = conditionals(0)
    draft_first, draft_second = conditionals(1)
    config = SETTINGS[setting]
    tree = build_tree(POLICIES[policy], draft_first, draft_second, DRAWS)
    torch.manual_seed(0)
    warpers = build_warpers(config)
    verdict = verify_tree(tree, target_logits_at_nodes(tree, first, second), warpers, True)
    pairs = first_two_tokens(tree, verdict, second, warpers)
    assert chi_square_excess(pairs, processed_joint(first, second, config)) < 0


def ratio_rule_sampler(tree: DraftTree, first, second, draft_first, draft_second) -> torch.Tensor:
    """The rule for children drawn from q (accept child c with min(1, p(c) / q(c)), else draw from the residual),
    wrongly applied to a deterministic top-1 chain: it accepts the draft's favourite far too often."""
    p1, q1 = torch.softmax(first, -1), torch.softmax(draft_first, -1)
    child = tree.tokens[:, 1]
    accept = torch.rand(child.shape) < (p1[child] / q1[child]).clamp(max=1)
    residual = (p1 - q1).clamp(min=0)
    fallback = torch.multinomial(residual / residual.sum(), child.shape[0], replacement=True)
    token_one = torch.where(accept, child, fallback)
    token_two = torch.multinomial(torch.softmax(second[token_one], -1), 1)[:, 0]
    return torch.stack([token_one, token_two], dim=1)


def test_the_distribution_test_rejects_the_ratio_rule_on_top_k_children():
    first, second = conditionals(0)
    draft_first, draft_second = conditionals(1)
    tree = build_tree(POLICIES["chain"], draft_first, draft_second, DRAWS)
    torch.manual_seed(0)
    pairs = ratio_rule_sampler(tree, first, second, draft_first, draft_second)
    joint = processed_joint(first, second, SETTINGS["plain"])
    assert chi_square_excess(pairs, joint) > 0


def test_the_distribution_test_rejects_a_two_percent_shift():
    """Power check: draws from the exact distribution mixed with 2% of the draft's own first token are rejected."""
    first, second = conditionals(0)
    draft_first, _ = conditionals(1)
    joint = processed_joint(first, second, SETTINGS["plain"])
    torch.manual_seed(0)
    cells = torch.multinomial(joint.flatten(), DRAWS, replacement=True)
    pairs = torch.stack([cells // VOCAB, cells % VOCAB], dim=1)
    shifted = torch.rand(DRAWS) < 0.02
    pairs[shifted, 0] = int(draft_first.argmax())
    assert chi_square_excess(pairs, joint) > 0
    unshifted = torch.stack([cells // VOCAB, cells % VOCAB], dim=1)
    assert chi_square_excess(unshifted, joint) < 0


def test_greedy_accepts_the_longest_matching_path():
    first, second = conditionals(0)
    tree = build_tree(POLICIES["tree"], first, second, 4)  # a draft identical to the target
    warpers = build_warpers(GenerationConfig())
    verdict = verify_tree(tree, target_logits_at_nodes(tree, first, second), warpers, False)
    assert verdict.num_accepted.tolist() == [2, 2, 2, 2]
    tokens = first_two_tokens(tree, verdict, second, warpers)
    assert tokens[0, 0] == first.argmax() and tokens[0, 1] == second[first.argmax()].argmax()


def sampled_chain(draft_first, draft_second, batch: int):
    """A 2-token chain drawn from the draft, as the engine draws it, with the distributions it was drawn from."""
    q_first = torch.softmax(draft_first, -1)
    token_one = torch.multinomial(q_first, batch, replacement=True)
    q_second = torch.softmax(draft_second[token_one], -1)  # [B, V]
    token_two = torch.multinomial(q_second, 1)[:, 0]
    tree = DraftTree.start(torch.zeros(batch, dtype=torch.long), 3)
    tree.add_level(
        1,
        torch.zeros(batch, 1, dtype=torch.long),
        token_one[:, None],
        torch.zeros(batch, 1),
        torch.ones(batch, 1, dtype=torch.bool),
    )
    tree.add_level(
        2,
        torch.ones(batch, 1, dtype=torch.long),
        token_two[:, None],
        torch.zeros(batch, 1),
        torch.ones(batch, 1, dtype=torch.bool),
    )
    draft_probs = torch.stack([q_first[None].expand(batch, -1), q_second], dim=1)
    return tree, draft_probs


def test_speculative_sampling_of_a_drafted_chain_follows_the_target_distribution():
    first, second = conditionals(0)
    draft_first, draft_second = conditionals(1)
    torch.manual_seed(0)
    tree, draft_probs = sampled_chain(draft_first, draft_second, DRAWS)
    target_probs = torch.softmax(target_logits_at_nodes(tree, first, second), -1)
    verdict = verify_sampled_chain(tree, target_probs, draft_probs)
    warpers = build_warpers(GenerationConfig())
    pairs = first_two_tokens(tree, verdict, second, warpers)
    assert chi_square_excess(pairs, processed_joint(first, second, SETTINGS["plain"])) < 0
    assert 0 < verdict.num_accepted.float().mean() < 2


def test_the_distribution_test_rejects_speculative_sampling_without_the_residual():
    """Negative control: after a rejection, drawing from p instead of max(p - q, 0) over-weights the draft's
    favourite tokens."""
    first, second = conditionals(0)
    draft_first, draft_second = conditionals(1)
    torch.manual_seed(0)
    tree, draft_probs = sampled_chain(draft_first, draft_second, DRAWS)
    target_probs = torch.softmax(target_logits_at_nodes(tree, first, second), -1)
    verdict = verify_sampled_chain(tree, target_probs, draft_probs)
    rows = (verdict.num_accepted < 2).nonzero().squeeze(-1)
    verdict.next_token[rows] = torch.multinomial(target_probs[rows, verdict.num_accepted[rows]], 1)[:, 0]
    pairs = first_two_tokens(tree, verdict, second, build_warpers(GenerationConfig()))
    assert chi_square_excess(pairs, processed_joint(first, second, SETTINGS["plain"])) > 0
