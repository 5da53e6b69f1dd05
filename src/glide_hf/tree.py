"""Draft trees: their static-shape layout and the policies that grow them.

A tree of one decoding round lives in `[B, N]` tensors, node 0 being the root (the last emitted token, not yet in
the target's cache). Nodes are grouped by level; level l holds `widths[l - 1]` nodes, each a child of a node of level
l - 1, and the first `expand[l - 1]` nodes of a level (the best-scored ones) are fed through the draft to grow the next
level. Shapes never depend on the data: a policy that wants fewer nodes marks the rest invalid, and invalid nodes can
never be accepted.

Policies (all choose children deterministically from the draft's log-probabilities, which is what makes the
engine's acceptance rule exact, see `sampling.py`):

- `chain(k)`: k levels of one node each, the draft's argmax: classic speculative decoding.
- `static_tree(widths)`: LongSpec's dynamic beam, e.g. `(4, 16, 16, 16, 16)`: level l keeps the `widths[l]` best
  (parent, token) pairs by cumulative draft log-probability over all nodes of level l - 1.
- `cape(depth, bins)`: GLIDE's confidence-aware proposal expansion: a greedy spine of `depth` tokens; at each step
  the spine's parent also proposes the next-best tokens as leaves, more of them when the draft is unsure
  (`bins[floor(10 * p_top1)]` candidates including the spine token).
"""

import numbers
from dataclasses import dataclass

import torch

from .errors import GlideConfigError

__all__ = [
    "CAPE_DEFAULT_BINS",
    "TREE_DEFAULT_WIDTHS",
    "DraftTree",
    "TreePolicy",
    "cape",
    "chain",
    "make_policy",
    "static_tree",
]

# GLIDE's `cape.sh` default: p_top1 < 0.3 -> 8 candidates, < 0.6 -> 6, < 0.8 -> 4, else 2 (index = floor(10 * p)).
CAPE_DEFAULT_BINS = (8, 8, 8, 6, 6, 6, 4, 4, 2, 2, 2)
# LongSpec's default tree: 4 candidates at the first level, 16 at each of the next four.
TREE_DEFAULT_WIDTHS = (4, 16, 16, 16, 16)


@dataclass(frozen=True)
class TreePolicy:
    """How one round's draft tree is grown.

    Attributes:
        kind: `"chain"`, `"static"` or `"cape"`.
        widths: nodes per level, root excluded.
        expand: nodes per level that are fed through the draft (the best ones); the last level is never fed.
        cape_bins: for `"cape"`, candidates per confidence decile.
    """

    kind: str
    widths: tuple[int, ...]
    expand: tuple[int, ...]
    cape_bins: tuple[int, ...] = ()

    @property
    def num_nodes(self) -> int:
        return 1 + sum(self.widths)

    @property
    def depth(self) -> int:
        return len(self.widths)

    def level_start(self, level: int) -> int:
        """Index of the first node of `level` (1-based; level 0 is the root)."""
        return 1 + sum(self.widths[: level - 1])

    def select(
        self, level: int, logprobs: torch.Tensor, parent_scores: torch.Tensor, cape_bins: torch.Tensor | None = None
    ):
        """Children for `level` from the fed parents' draft log-probabilities.

        Args:
            logprobs (`torch.Tensor` `[B, P, V]`): log-probabilities after each of the P fed parents.
            parent_scores (`torch.Tensor` `[B, P]`): cumulative log-probabilities of those parents.
            cape_bins (`torch.Tensor`, *optional*): `self.cape_bins` on the device (made once per call, so that a
                round holds no host-to-device copy and can be captured in a CUDA graph).

        Returns:
            `(parent, tokens, scores, valid)`, each `[B, widths[level - 1]]`; `parent` indexes the P fed parents.
        """
        width = self.widths[level - 1]
        batch, num_parents, vocab = logprobs.shape
        if self.kind == "cape":
            top, tokens = logprobs[:, 0].topk(width, dim=-1)  # the spine node is the only fed parent
            confidence = top[:, 0].exp()  # [B]
            if cape_bins is None:
                cape_bins = torch.tensor(self.cape_bins, device=logprobs.device)
            decile = (confidence * 10).long().clamp(0, len(self.cape_bins) - 1)
            count = cape_bins[decile].clamp(max=width)  # [B]
            valid = torch.arange(width, device=logprobs.device)[None] < count[:, None]
            parent = torch.zeros_like(tokens)
            return parent, tokens, parent_scores[:, :1] + top, valid
        candidates = (parent_scores[:, :, None] + logprobs).reshape(batch, num_parents * vocab)
        scores, flat = candidates.topk(width, dim=-1)
        valid = torch.ones_like(flat, dtype=torch.bool)
        return flat // vocab, flat % vocab, scores, valid


def _is_positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _positive_ints(name: str, values, length: int | None = None) -> tuple[int, ...]:
    """`values` as a tuple of positive Python ints (`length` of them when given), or a `GlideConfigError`."""
    if isinstance(values, (list, tuple)) and all(_is_positive_int(value) for value in values) and values:
        if length is None or len(values) == length:
            return tuple(int(value) for value in values)
    expected = f"{length} positive integers" if length is not None else "a non-empty list of positive integers"
    raise GlideConfigError(f"`{name}` must be {expected}, got {values!r}.")


def chain(num_tokens: int) -> TreePolicy:
    if not _is_positive_int(num_tokens):
        raise GlideConfigError(f"A draft chain needs a positive integer `num_draft_tokens`, got {num_tokens!r}.")
    return TreePolicy("chain", (1,) * num_tokens, (1,) * num_tokens)


def static_tree(widths: tuple[int, ...] | list[int]) -> TreePolicy:
    widths = _positive_ints("tree_widths", widths)  # one per level
    return TreePolicy("static", widths, widths)


def cape(depth: int, bins: tuple[int, ...] | list[int] = CAPE_DEFAULT_BINS) -> TreePolicy:
    if not _is_positive_int(depth):
        raise GlideConfigError(f"CAPE needs a positive integer depth (`num_draft_tokens`), got {depth!r}.")
    # One count per decile of the draft's top probability, floor(10 * p) = 0..10.
    bins = _positive_ints("cape_bins", bins, length=len(CAPE_DEFAULT_BINS))
    width = max(bins)
    return TreePolicy("cape", (width,) * depth, (1,) * depth, bins)


def make_policy(strategy: str, num_draft_tokens: int, tree_widths=None, cape_bins=None) -> TreePolicy:
    """The policy for a `draft_strategy` name (`"chain"`, `"tree"`, `"cape"`); refuses arguments the strategy does
    not read (`tree_widths` outside `"tree"`, `cape_bins` outside `"cape"`)."""
    if strategy not in ("chain", "tree", "cape"):
        raise GlideConfigError(f"Unknown `draft_strategy={strategy!r}`: expected 'chain', 'tree' or 'cape'.")
    if tree_widths is not None and strategy != "tree":
        raise GlideConfigError(f"`tree_widths` applies to `draft_strategy='tree'`, not {strategy!r}.")
    if cape_bins is not None and strategy != "cape":
        raise GlideConfigError(f"`cape_bins` applies to `draft_strategy='cape'`, not {strategy!r}.")
    if strategy == "chain":
        return chain(num_draft_tokens)
    if strategy == "tree":
        return static_tree(tree_widths if tree_widths is not None else TREE_DEFAULT_WIDTHS)
    return cape(num_draft_tokens, cape_bins if cape_bins is not None else CAPE_DEFAULT_BINS)


@dataclass
class DraftTree:
    """One round's tree for every row: tokens, parents, depths, validity and ancestor-or-self relation."""

    tokens: torch.Tensor  # [B, N] long
    parents: torch.Tensor  # [B, N] long, root -1
    depths: torch.Tensor  # [B, N] long
    valid: torch.Tensor  # [B, N] bool
    ancestors: torch.Tensor  # [B, N, N] bool, ancestors[b, i, j]: j is i or an ancestor of i
    scores: torch.Tensor  # [B, N] float, cumulative draft log-probability

    @classmethod
    def start(cls, root: torch.Tensor, num_nodes: int) -> "DraftTree":
        batch, device = root.shape[0], root.device
        tokens = torch.zeros(batch, num_nodes, dtype=torch.long, device=device)
        tokens[:, 0] = root
        ancestors = torch.zeros(batch, num_nodes, num_nodes, dtype=torch.bool, device=device)
        ancestors[:, 0, 0] = True
        valid = torch.zeros(batch, num_nodes, dtype=torch.bool, device=device)
        valid[:, 0] = True
        return cls(
            tokens=tokens,
            parents=torch.full_like(tokens, -1),
            depths=torch.zeros_like(tokens),
            valid=valid,
            ancestors=ancestors,
            scores=torch.zeros(batch, num_nodes, device=device),
        )

    def add_level(self, start: int, parents, tokens, scores, valid) -> None:
        """Write nodes `start : start + width` as children of the nodes `parents` `[B, width]` (tree indices)."""
        width = tokens.shape[1]
        nodes = slice(start, start + width)
        self.tokens[:, nodes] = tokens
        self.parents[:, nodes] = parents
        self.depths[:, nodes] = self.depths.gather(1, parents) + 1
        self.valid[:, nodes] = valid & self.valid.gather(1, parents)
        self.scores[:, nodes] = scores
        parent_rows = self.ancestors.gather(1, parents[:, :, None].expand(-1, -1, self.ancestors.shape[-1]))
        own = (
            torch.arange(self.ancestors.shape[-1], device=tokens.device)
            == torch.arange(start, start + width, device=tokens.device)[:, None]
        )  # [width, N]: each new node is its own ancestor
        self.ancestors[:, nodes] = parent_rows | own[None]

    def select_rows(self, rows: torch.Tensor) -> None:
        for name in ("tokens", "parents", "depths", "valid", "ancestors", "scores"):
            setattr(self, name, getattr(self, name)[rows])
