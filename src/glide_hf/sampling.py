"""Verification of a draft tree against the target: which nodes are accepted, and the token that follows.

Sampled chains use standard speculative sampling (`verify_sampled_chain`): the draft samples its tokens, each is
accepted with probability min(1, p / q), and a rejection is replaced by a draw from the residual max(p - q, 0).
Everything else (greedy decoding, trees and CAPE) uses one rule (engine-notes section 2, rule 1): at every
node v the engine draws `s_v` from the target's processed distribution at v (its argmax when greedy); a child is
accepted when its token equals its parent's draw, and the token emitted after the deepest accepted node is that
node's draw. Every emitted token is therefore a draw from the target given the accepted prefix, so the output
follows the target's distribution exactly. This holds because the draft chooses its candidates deterministically
from its own logits (`tree.py`), independently of the verifier's random numbers, and sibling tokens are distinct.

Logits are processed as `target.generate` does, on the device: the repetition penalty over each node's own history
(`apply_repetition_penalty`), end-of-sequence suppressed while fewer than `min_new_tokens` tokens exist, then
temperature, top-k, top-p and min-p (Transformers' own warpers, fp32). With a user `logits_processor` or other
history-dependent settings (`no_repeat_ngram_size`, ...), the engine instead applies Transformers' whole processor
list to each node with that node's own history (prompt, tokens so far, the node's ancestors), on the host, before
calling `verify_tree`.
"""

from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .errors import UnsupportedGenerationError
from .tree import DraftTree

__all__ = [
    "Verdict",
    "apply_repetition_penalty",
    "build_warpers",
    "check_generation_config",
    "needs_token_histories",
    "process_target_logits",
    "sample",
    "verify_sampled_chain",
    "verify_tree",
]

# Settings whose processors read each token's history and run on the host, per tree node (the repetition penalty,
# which also reads histories, runs on the device instead: `apply_repetition_penalty`).
_HISTORY_DEPENDENT = {
    "no_repeat_ngram_size": 0,
    # With each row's prompt as the "encoder input", as Transformers applies them to decoder-only models.
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "renormalize_logits": False,
    "watermarking_config": None,
    # Not history-dependent, but only Transformers' own processor list implements them: the host path runs it.
    "min_length": 0,
    "exponential_decay_length_penalty": None,
    "top_h": None,
    "remove_invalid_values": False,
}


def needs_token_histories(config: GenerationConfig) -> bool:
    """Whether `config` asks for a logits processor that reads each token's history and that the engine does not
    run on the device (the repetition penalty alone runs there: `apply_repetition_penalty`)."""
    return any(getattr(config, name, neutral) not in (None, neutral) for name, neutral in _HISTORY_DEPENDENT.items())


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, path_tokens: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Transformers' repetition penalty at every tree node, on the device.

    `logits` `[B, N, V]`; `seen` `[B, V]` bool: the tokens of each row's prompt and output so far (its root
    included); `path_tokens` `[B, N, D]`: each node's own tokens below the root, padded with tokens of `seen`.
    A token of a node's history has its logit divided by `penalty` when positive and multiplied when negative, once,
    as `RepetitionPenaltyLogitsProcessor` does for the history `prompt + output + path`.
    """

    def penalized(values: torch.Tensor) -> torch.Tensor:
        return torch.where(values < 0, values * penalty, values / penalty)

    logits = torch.where(seen[:, None, :], penalized(logits), logits)
    # Path tokens the row has not seen yet; a token repeated along a path gets the same value at each occurrence.
    fresh = ~seen.gather(1, path_tokens.flatten(1)).view_as(path_tokens)
    values = logits.gather(2, path_tokens)
    return logits.scatter(2, path_tokens, torch.where(fresh, penalized(values), values))


def check_generation_config(config: GenerationConfig) -> None:
    """Raise `UnsupportedGenerationError` for a mode or setting the engine does not implement."""
    if (config.num_beams or 1) > 1:
        raise UnsupportedGenerationError(
            f"`num_beams={config.num_beams}`: beam search is not speculative; call `target.generate` for it."
        )
    for name in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(config, name, False):
            raise UnsupportedGenerationError(
                f"`{name}=True` is not supported by the GLIDE engine: it returns sequences and acceptance "
                "statistics only. Use `target.generate(..., assistant_model=draft)` for scores."
            )
    for name in ("stop_strings", "prompt_lookup_num_tokens", "assistant_early_exit"):
        if getattr(config, name, None) is not None:
            raise UnsupportedGenerationError(
                f"`{name}` is not supported by the GLIDE engine; pass `stopping_criteria` or use `target.generate`."
            )
    penalty = getattr(config, "repetition_penalty", None)
    if penalty is not None and not (isinstance(penalty, (int, float)) and penalty > 0):
        raise UnsupportedGenerationError(
            f"`repetition_penalty` must be a positive number (1.0: none), got {penalty!r}."
        )
    if getattr(config, "guidance_scale", None) not in (None, 1.0):
        raise UnsupportedGenerationError(
            f"`guidance_scale={config.guidance_scale}` (classifier-free guidance) is not supported by the GLIDE "
            "engine."
        )
    # Other decoding methods than sampling and greedy search, and token healing (which rewrites the prompt).
    for name, neutral in (("penalty_alpha", None), ("dola_layers", None), ("token_healing", False)):
        if getattr(config, name, neutral) not in (None, neutral, 0):
            raise UnsupportedGenerationError(
                f"`{name}={getattr(config, name)!r}` selects a decoding method the GLIDE engine does not implement "
                "(it decodes greedily or by sampling); call `target.generate` for it."
            )


def build_warpers(config: GenerationConfig) -> LogitsProcessorList:
    """Transformers' sampling warpers for `config`, in `generate`'s order."""
    warpers = LogitsProcessorList()
    if not config.do_sample:
        return warpers
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    return warpers


@dataclass
class Verdict:
    """The outcome of verifying one round's tree, per row."""

    num_accepted: torch.Tensor  # [B] drafted tokens accepted (0..depth)
    path: torch.Tensor  # [B, depth + 1] node index at each depth of the accepted path (padded with its depth)
    next_token: torch.Tensor  # [B] the target's token after the accepted path


def process_target_logits(
    target_logits: torch.Tensor,
    warpers: LogitsProcessorList,
    do_sample: bool,
    suppress_eos: torch.Tensor | None = None,
    eos_token_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The target's logits `[B, N, V]` as `generate` would sample or argmax them: fp32, end-of-sequence suppressed
    where asked, then the sampling warpers (when sampling)."""
    batch, num_nodes, vocab = target_logits.shape
    logits = target_logits.float()
    if suppress_eos is not None and eos_token_ids is not None and eos_token_ids.numel() > 0:
        forbidden = torch.zeros(vocab, dtype=torch.bool, device=logits.device).index_fill_(0, eos_token_ids, True)
        logits = logits.masked_fill(suppress_eos[:, :, None] & forbidden, float("-inf"))
    if do_sample and len(warpers) > 0:
        logits = warpers(None, logits.reshape(batch * num_nodes, vocab)).reshape(batch, num_nodes, vocab)
    return logits


def sample(weights: torch.Tensor) -> torch.Tensor:
    """One draw per row from non-negative (not necessarily normalised) `weights` `[..., V]`.

    Exponential race: argmax(w / E) with E ~ Exp(1) is a draw from w / sum(w), with no host synchronisation.
    """
    return (weights / torch.empty_like(weights).exponential_()).argmax(dim=-1)


def verify_tree(
    tree: DraftTree,
    target_logits: torch.Tensor,
    warpers: LogitsProcessorList,
    do_sample: bool,
    suppress_eos: torch.Tensor | None = None,
    eos_token_ids: torch.Tensor | None = None,
    max_depth: int | None = None,
) -> Verdict:
    """Accept the deepest path of `tree` whose every token matches the target's draw at its parent.

    Args:
        tree (`DraftTree`): the round's tree, `N` nodes per row.
        target_logits (`torch.Tensor` `[B, N, V]`): the target's logits at every node.
        warpers (`LogitsProcessorList`): sampling warpers (ignored when greedy).
        do_sample (`bool`): draw from the processed distribution instead of taking its argmax.
        suppress_eos (`torch.Tensor` `[B, N]` bool, *optional*): nodes after which end-of-sequence is forbidden
            (fewer than `min_new_tokens` tokens so far), as Transformers' `MinNewTokensLengthLogitsProcessor` does.
        eos_token_ids (`torch.Tensor`, *optional*): the end-of-sequence tokens `suppress_eos` applies to.
        max_depth (`int`, *optional*): the tree's depth, if known (avoids reading it from the device).
    """
    logits = process_target_logits(target_logits, warpers, do_sample, suppress_eos, eos_token_ids)
    draws = sample(torch.softmax(logits, dim=-1)) if do_sample else logits.argmax(dim=-1)  # [B, N]
    batch, num_nodes = draws.shape
    parents = tree.parents.clamp(min=0)
    matches = tree.valid & (tree.tokens == draws.gather(1, parents))
    matches[:, 0] = True  # the root is already emitted
    accepted = ~(tree.ancestors & ~matches[:, None, :]).any(-1)  # every ancestor-or-self matches
    best = torch.where(accepted, tree.depths, -1).argmax(dim=-1)  # [B], the deepest accepted node
    num_accepted = tree.depths.gather(1, best[:, None])[:, 0]
    on_path = tree.ancestors[torch.arange(batch, device=best.device), best]  # [B, N]
    if max_depth is None:
        max_depth = int(tree.depths.max())
    depth_grid = torch.arange(max_depth + 1, device=best.device)
    node_at_depth = on_path[:, None, :] & (tree.depths[:, None, :] == depth_grid[None, :, None])  # [B, D+1, N]
    node_index = torch.arange(num_nodes, device=best.device)
    path = (node_at_depth.long() * node_index).sum(-1)
    path = torch.where(node_at_depth.any(-1), path, depth_grid[None].expand_as(path))
    return Verdict(num_accepted=num_accepted, path=path, next_token=draws.gather(1, best[:, None])[:, 0])


def verify_sampled_chain(tree: DraftTree, target_probs: torch.Tensor, draft_probs: torch.Tensor) -> Verdict:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for a chain whose tokens were drawn from the
    draft: accept token i while `u_i < p_i(x_i) / q_i(x_i)`; at the first rejection draw from
    `max(p_i - q_i, 0)`; when every token passes, draw the next token from the target after the last one.

    Args:
        tree (`DraftTree`): a chain, node i (1..k) holding the token drawn from `draft_probs[:, i - 1]`.
        target_probs (`torch.Tensor` `[B, k + 1, V]`): the target's processed distribution after each node.
        draft_probs (`torch.Tensor` `[B, k, V]`): the exact distributions the draft tokens were drawn from.
    """
    batch, num_nodes, vocab = target_probs.shape
    depth = num_nodes - 1
    drafted = tree.tokens[:, 1:]  # [B, k]
    p_drafted = target_probs[:, :depth].gather(-1, drafted[..., None])[..., 0]
    q_drafted = draft_probs.gather(-1, drafted[..., None])[..., 0]  # > 0: each token was drawn from q
    # `u < p / q` written without the division; u in [0, 1), so a token with p = 0 is never accepted.
    passes = (torch.rand_like(p_drafted) * q_drafted < p_drafted) & tree.valid[:, 1:]
    num_accepted = passes.long().cumprod(dim=-1).sum(dim=-1)  # [B]
    index = num_accepted[:, None, None].expand(-1, 1, vocab)
    p_next = target_probs.gather(1, index)[:, 0]
    q_next = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1).gather(1, index)[:, 0]
    residual = (p_next - q_next).clamp(min=0)
    # p == q leaves no residual mass, but then a rejection cannot happen: the draw falls back to p for safety.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    path = torch.arange(num_nodes, device=drafted.device)[None].expand(batch, -1)
    return Verdict(num_accepted=num_accepted, path=path, next_token=sample(residual))
