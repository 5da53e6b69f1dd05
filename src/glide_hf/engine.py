"""GLIDE's own decoding engine: `GlideForCausalLM.generate()` for batches, chains, trees and CAPE.

One round, for every row of the batch at once:

1. draft: feed the last accepted token and the newest target token (the tree's root) through the draft, then grow
   the tree level by level (`tree.py`); the draft reads each row's verified target cache and its own ring cache;
2. verify: one target forward over all tree nodes, with a mask that shows each node the row's prefix and its own
   ancestors, at positions `length + depth`, written to slots `length + node`;
3. accept: the deepest path whose tokens match the target's draws (`sampling.py`), plus the target's next token;
4. compact: move the accepted nodes' keys/values to contiguous slots in every target layer, and their draft keys
   into the draft's ring, so that nothing is re-fed;
5. append the new tokens, stop rows that produced end-of-sequence or reached their budget, and drop finished rows
   from the batch.

Rows keep their own lengths (`static_cache.py`), so a row that accepts five tokens never waits for one that accepts
none. A round has static shapes and no host synchronisation, so on CUDA it is captured once and replayed as one
CUDA graph; one host synchronisation per round then decides which rows finished. The verify forward attends
either through one explicit mask over the slot buffer, or split (`tree_attention.py`): each row's prefix in
split-KV chunks, the tree through a small mask, merged by log-sum-exp (in Triton where installed). The draft runs
inside `fused_for_inference()` and the target inside `triton_rms_norms`: fewer, larger kernels per step.
"""

import contextlib
import numbers
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.stopping_criteria import MaxTimeCriteria, StoppingCriteriaList
from transformers.utils import ModelOutput, logging

from .errors import CacheStateError, GlideConfigError, TargetNotAttachedError, UnsupportedGenerationError
from .loss import head_device, head_logits, linear_head_weights
from .norm_kernel import triton_rms_norms
from .sampling import (
    apply_repetition_penalty,
    build_warpers,
    check_generation_config,
    needs_token_histories,
    process_target_logits,
    sample,
    verify_sampled_chain,
    verify_tree,
)
from .static_cache import DraftRingCache, SlotCache
from .tree import DraftTree, TreePolicy, chain, make_policy
from .tree_attention import (
    SPLIT_KERNELS,
    TREE_ATTENTION,
    TreeAttentionInputs,
    prefix_attention,
    prefix_attention_serves,
    split_attention_kernel,
    split_kernel_serves,
    tree_attention_forward,
    using_tree_attention,
)

logger = logging.get_logger(__name__)

# Cache size (slots) from which `verify_attention="auto"` splits, per split kernel. On an H200 at Llama-3-8B shape
# the Triton split beats the masked forward from 1k context on; the flash prefix with torch's merge only from about
# 4k (docs/benchmarks.md).
SPLIT_VERIFY_MIN_SLOTS = {"triton": 0, "flash": 4096, "torch": 0}

__all__ = ["GlideGenerateOutput", "glide_generate"]

# The draft's ring holds its window plus the two tokens each round's first draft step writes (the last accepted
# token and the root), so that writing them never evicts a key some query of that step still needs.
RING_SLACK = 2

# With CUDA graphs the target cache's slot count is rounded up to a multiple of this, so that calls whose prompts
# differ in length by less share one captured round (`_KeptRound`); each extra slot costs one token of KV memory.
GRAPH_SLOT_STEP = 256


@dataclass
class GlideGenerateOutput(ModelOutput):
    """What `generate(..., return_dict_in_generate=True)` returns.

    Args:
        sequences (`torch.LongTensor` `[B, prompt + new]`): prompts (as given, padding included) and new tokens,
            padded with `pad_token_id` after a row ends.
        num_target_forwards (`int`): target forward passes, the prefill included.
        num_rounds (`int`): draft-and-verify rounds.
        accepted_per_round (`torch.LongTensor` `[rounds, B]`): drafted tokens accepted by each row in each round,
            -1 once the row had finished.
        new_tokens (`torch.LongTensor` `[B]`): tokens generated per row.
        tokens_per_target_forward (`float`): all new tokens over all target forwards of the batch (the speedup
            speculative decoding can give at best, for batch 1).
        scores, logits, attentions, hidden_states, past_key_values: always None (the engine does not return them;
            asking for them raises). There so that code reading Transformers' `GenerateDecoderOnlyOutput` works.
    """

    sequences: torch.LongTensor | None = None
    num_target_forwards: int | None = None
    num_rounds: int | None = None
    accepted_per_round: torch.LongTensor | None = None
    new_tokens: torch.LongTensor | None = None
    tokens_per_target_forward: float | None = None
    scores: tuple | None = None
    logits: tuple | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    past_key_values: object | None = None


@dataclass
class _Rows:
    """Per-row decoding state of the rows still running; `index` maps them to the caller's batch."""

    index: torch.Tensor  # [B] original row
    lengths: torch.Tensor  # [B] tokens in the target cache = position of the root
    roots: torch.Tensor  # [B] newest token (sampled by the target, not yet in its cache)
    previous: torch.Tensor  # [B] token at position lengths - 1
    generated: torch.Tensor  # [B] new tokens so far
    seen: torch.Tensor | None = None  # [B, V] bool: tokens of the prompt and output, for the repetition penalty

    def select(self, keep: torch.Tensor) -> None:
        for name in ("index", "lengths", "roots", "previous", "generated", "seen"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[keep])


@dataclass
class _Call:
    """Everything one `generate` call needs besides the row state."""

    draft: object
    target: object
    policy: TreePolicy
    config: GenerationConfig
    warpers: object
    eos_token_ids: list[int]
    max_new_tokens: int
    min_new_tokens: int
    target_cache: SlotCache
    draft_cache: DraftRingCache
    stopping_criteria: StoppingCriteriaList | None
    forced_acceptance: float | None
    prompts: torch.Tensor
    eos_tensor: torch.Tensor  # [E] end-of-sequence ids on the device (made once: rounds hold no host copies)
    cape_bins: torch.Tensor | None
    use_cuda_graphs: bool
    split_verify: bool  # verify through `tree_attention.py` rather than one explicit mask
    split_kernel: str  # ... with this kernel (`tree_attention.SPLIT_KERNELS`)
    history_processors: list | None  # per row: Transformers' full processor list, applied per node with its history
    repetition_penalty: float | None  # applied on the device (`apply_repetition_penalty`) when not None
    new_tokens: torch.Tensor | None = None  # [B] tokens generated by each finished row, in the caller's order
    # The draft's output head: the target's LM head, or its rows for `draft.draft_vocab_ids` (then the draft's
    # logits index those ids, and `draft_vocab_ids` maps them back to token ids). No weight: a quantized or wrapped
    # head, called as a module.
    draft_vocab_ids: torch.Tensor | None = None
    draft_head_weight: torch.Tensor | None = None
    draft_head_bias: torch.Tensor | None = None
    # The target's rotary (cos, sin) `[P, D]` for every position a draft step can take, made once per call; None for
    # rotary embeddings whose values depend on the longest position seen (dynamic NTK, LongRoPE).
    rotary_table: tuple[torch.Tensor, torch.Tensor] | None = None
    accepted: list = field(default_factory=list)
    num_target_forwards: int = 0
    forced_rounds: torch.Tensor | None = None  # benchmark only: rounds run so far, on the device (a 0-d float64)


class _KeptRound:
    """The buffers a captured round reads and writes, with its graphs, kept on the draft from one `generate` call to
    the next with the same `signature`.

    A CUDA graph replays fixed addresses. A later call with the same signature (batch, cache size, sampling settings,
    the models' own tensors, ...) writes its state into these buffers instead of allocating new ones, and replays the
    kept graphs instead of capturing them again (about 50 ms per call at Llama-3-8B size, docs/benchmarks.md). Only
    the full batch's graphs are kept: the rounds after finished rows leave the batch run on new, smaller buffers.
    """

    def __init__(self, signature: tuple | None) -> None:
        self.signature = signature
        self.tensors: dict[str, torch.Tensor] = {}
        self.fused_weights: dict = {}  # the draft's concatenated projections (`fused_for_inference(kept_weights)`)
        self.target_cache: SlotCache | None = None
        self.draft_cache: DraftRingCache | None = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, _RoundResult]] = {}  # tree size -> graph, its result
        self.lock = threading.Lock()  # held by the call using the buffers

    def take(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """`value` in the kept buffer `name`: copied into it, or kept itself the first time."""
        kept = self.tensors.get(name)
        if kept is None:
            self.tensors[name] = value
            return value
        if kept.shape != value.shape or kept.dtype != value.dtype or kept.device != value.device:
            raise CacheStateError(
                f"The engine's kept buffer `{name}` {tuple(kept.shape)} does not fit this call's "
                f"{tuple(value.shape)}: call `draft.release_cuda_graphs()` and report this as a bug."
            )
        return kept.copy_(value)


class _EngineState:
    """What the engine keeps on a draft between calls: the code paths whose warm-up round has run, and the last
    call's captured round. Copies of the draft (`copy.deepcopy`, pickling) start empty: graphs cannot be copied."""

    def __init__(self) -> None:
        self.warm_code_paths: set = set()
        self.kept_round: _KeptRound | None = None

    def __deepcopy__(self, memo) -> "_EngineState":
        return _EngineState()

    def __reduce__(self):
        return (_EngineState, ())


def engine_state(draft) -> _EngineState:
    state = getattr(draft, "_glide_engine_state", None)
    if state is None:
        state = draft._glide_engine_state = _EngineState()
    return state


def release_cuda_graphs(draft) -> None:
    """Drop the captured round and the buffers the engine keeps on `draft` between calls (see `_KeptRound`)."""
    engine_state(draft).kept_round = None


@contextlib.contextmanager
def _kept_round(draft, signature: tuple | None) -> Iterator[_KeptRound]:
    """The kept round for `signature`, held for the block (None: a call without CUDA graphs, which keeps nothing).
    Another signature's round is dropped first, so that its buffers are free before this call allocates its own. A
    call that finds the round in use (another thread, or a streamer or stopping criterion generating with the same
    draft) gets buffers of its own, kept by no one."""
    state = engine_state(draft)
    kept = state.kept_round
    if signature is None or (kept is not None and kept.lock.locked()):
        yield _KeptRound(None)
        return
    if kept is None or kept.signature != signature:
        state.kept_round = None
        kept = state.kept_round = _KeptRound(signature)
    if not kept.lock.acquire(blocking=False):  # taken since the check above
        yield _KeptRound(None)
        return
    try:
        yield kept
    finally:
        kept.lock.release()


def _graph_signature(draft, input_ids: torch.Tensor, settings: tuple) -> tuple:
    """What a captured round depends on besides the values in its buffers: the inputs' batch and device, the call's
    settings, and the address, shape and dtype of every tensor of both models (a graph reads them in place, so
    moved or reloaded weights need a new capture; weights changed in place do not)."""
    model_tensors = tuple(
        (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)) for tensor in (*draft.parameters(), *draft.buffers())
    )
    return (input_ids.shape[0], str(input_ids.device), settings, model_tensors)


def glide_generate(
    draft,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    logits_processor=None,
    streamer=None,
    draft_strategy: str = "chain",
    num_draft_tokens: int | None = None,
    tree_widths: tuple[int, ...] | None = None,
    cape_bins: tuple[int, ...] | None = None,
    forced_acceptance: float | None = None,
    use_cuda_graphs: bool | None = None,
    verify_attention: str = "auto",
    split_verify_min_slots: int | None = None,
    split_kernel: str = "auto",
    num_draft_tokens_schedule: str = "constant",
    **kwargs,
):
    """Decode with the target, drafting with `draft`; see `GlideForCausalLM.generate` for the arguments.

    `forced_acceptance` is a benchmark-only switch: every round pretends the first k drafts matched, so the output is
    not the target's; a fractional k alternates so that the first r rounds accept `floor(r * k)` drafts in all.
    `use_cuda_graphs` (default: on CUDA) replays each round as one captured CUDA graph.
    `verify_attention`: `"masked"` verifies with one explicit mask over the slot buffer (sdpa or eager); `"split"`
    attends to the prefix and to the tree separately and merges them (`tree_attention.py`) with `split_kernel`:
    `"triton"` (the whole split in Triton kernels; CUDA, fp16/bf16/fp32, Triton installed), `"flash"` (the prefix
    in torch's flash kernel; CUDA, fp16/bf16), `"torch"` (a reference computation, anywhere), or `"auto"` (default:
    the first of these that serves); `verify_attention="auto"` (default) splits where a fused kernel serves
    (`"triton"` or `"flash"`), the target has no sliding-window layers and either the target cache holds at least
    `split_verify_min_slots` slots (prompt + new tokens + tree; default `SPLIT_VERIFY_MIN_SLOTS` of the kernel: 0
    for Triton, 4096 for the flash prefix, below which the masked forward is faster, see docs/benchmarks.md) or the
    target's own attention cannot take a mask (flash-attention); it masks otherwise.
    `num_draft_tokens_schedule` (chains only): `"constant"` drafts `num_draft_tokens` every round; `"heuristic"`
    adapts the chain's length between 1 and `num_draft_tokens` as Transformers' schedule of the same name does:
    start at the most, +2 after a round in which some row accepted every draft, -1 after any other round.
    """
    target = draft.target
    if target is None:
        raise TargetNotAttachedError(
            "This GLIDE draft has no target attached: load it with `from_pretrained(path, target_model=target)` or "
            "call `attach_target(target)` before `generate`."
        )
    _check_input_shapes(input_ids, attention_mask)
    _check_one_device(draft, input_ids, attention_mask)
    _check_input_values(input_ids, attention_mask, target.config.vocab_size)
    config, unused = target._prepare_generation_config(generation_config, **kwargs)
    if unused.get("synced_gpus"):
        raise UnsupportedGenerationError(
            "`synced_gpus=True` (generation across processes, as under DeepSpeed ZeRO-3) is not supported by the "
            "GLIDE engine: it runs on one device."
        )
    unused = {
        key: value for key, value in unused.items() if value is not None and key not in ("use_cache", "synced_gpus")
    }
    if unused:
        raise TypeError(f"`generate` got unexpected arguments: {sorted(unused)}.")
    check_generation_config(config)
    if num_draft_tokens is None:
        num_draft_tokens = draft.config.num_draft_tokens
    policy = make_policy(draft_strategy, num_draft_tokens, tree_widths, cape_bins)
    if forced_acceptance is not None and (
        not isinstance(forced_acceptance, numbers.Real)
        or isinstance(forced_acceptance, bool)
        or policy.kind != "chain"
        or not 0 <= forced_acceptance <= policy.depth
    ):
        raise GlideConfigError(
            f"`forced_acceptance` (benchmark only) needs `draft_strategy='chain'` and a value in 0..{policy.depth}."
        )
    _check_policy_fits(policy, draft.config.draft_vocab_size or target.config.vocab_size)
    if num_draft_tokens_schedule not in ("constant", "heuristic"):
        raise GlideConfigError(
            f"`num_draft_tokens_schedule={num_draft_tokens_schedule!r}` is not one of 'constant' or 'heuristic'."
        )
    adaptive = num_draft_tokens_schedule == "heuristic"
    if adaptive and (policy.kind != "chain" or forced_acceptance is not None):
        raise GlideConfigError(
            "`num_draft_tokens_schedule='heuristic'` adapts a chain's length: use it with `draft_strategy='chain'` "
            "and without `forced_acceptance`."
        )
    split_verify = _choose_verify_attention(verify_attention, target)
    eos_token_ids = _as_list(config.eos_token_id)
    pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos_token_ids or [0])[0]
    _check_token_ids(eos_token_ids, pad_token_id, target.config.vocab_size)
    eos_token_ids, pad_token_id = [int(i) for i in eos_token_ids], int(pad_token_id)
    if stopping_criteria is not None and not isinstance(stopping_criteria, StoppingCriteriaList):
        stopping_criteria = StoppingCriteriaList(stopping_criteria)  # a plain list, as `target.generate` takes
    if config.max_time is not None:  # as `target.generate`: one more criterion
        stopping_criteria = StoppingCriteriaList([*(stopping_criteria or []), MaxTimeCriteria(config.max_time)])
    prompt_length = input_ids.shape[1]
    # As `target.generate` (`_prepare_generated_length`): `max_new_tokens`, else a `max_length` given by the caller
    # or a generation config, else Transformers' default of `max_length` new tokens within the position limit.
    has_default_max_length = (
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and target.generation_config.max_length is None
    )
    if config.max_new_tokens is not None:
        max_new_tokens = config.max_new_tokens
    elif has_default_max_length:
        max_new_tokens = min(config.max_length + prompt_length, target.config.max_position_embeddings) - prompt_length
    else:
        max_new_tokens = config.max_length - prompt_length
    if max_new_tokens < 1:
        raise UnsupportedGenerationError(
            f"Nothing to generate: the prompt has {prompt_length} tokens and `max_length={config.max_length}`. Set "
            "`max_new_tokens` (or a larger `max_length`)."
        )
    config.max_length = prompt_length + max_new_tokens  # what Transformers' processors read (forced end-of-sequence)
    max_positions = target.config.max_position_embeddings
    if prompt_length + max_new_tokens + policy.depth > max_positions:
        raise UnsupportedGenerationError(
            f"A prompt of {prompt_length} tokens plus `max_new_tokens={max_new_tokens}` and {policy.depth} draft "
            f"levels exceeds the target's `max_position_embeddings={max_positions}`."
        )
    if attention_mask is None:
        # As `target.generate`: padding is told by `pad_token_id` where the inputs hold it and it is no end-of-sequence
        # id (otherwise every token counts, with Transformers' warning).
        target._prepare_special_tokens(config, kwargs_has_attention_mask=False, device=input_ids.device)
        attention_mask = target._prepare_attention_mask_for_generation(input_ids, config, {})
    if bool((attention_mask[:, -1] == 0).any()):
        logger.warning_once(
            "Right padding in the prompts: the GLIDE engine aligns each row itself, so its output continues every "
            "prompt, while `target.generate` would continue after the padding and give another output. Pad on the "
            "left (`padding_side='left'`) for the same output as `target.generate`."
        )
    num_samples = config.num_return_sequences or 1
    if num_samples > 1:  # as `target.generate`: each prompt's samples are consecutive rows of one batch
        input_ids = input_ids.repeat_interleave(num_samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    per_node_histories = bool(logits_processor) or needs_token_histories(config)
    if use_cuda_graphs and per_node_histories:
        raise UnsupportedGenerationError(
            "History-dependent logits processing (a `logits_processor`, `no_repeat_ngram_size`, `min_length`, ...) "
            "runs per node on the host and cannot be captured in a CUDA graph: pass `use_cuda_graphs=False`."
        )
    if use_cuda_graphs and not input_ids.is_cuda:
        raise UnsupportedGenerationError("`use_cuda_graphs=True` needs the inputs and the models on a CUDA device.")
    if use_cuda_graphs is None:
        use_cuda_graphs = input_ids.is_cuda and not per_node_histories
    num_slots = _slots_needed(prompt_length, max_new_tokens, policy)
    signature = None
    if use_cuda_graphs:
        num_slots = -(-num_slots // GRAPH_SLOT_STEP) * GRAPH_SLOT_STEP
        settings = (
            num_slots,
            max_new_tokens,
            config.min_new_tokens,
            policy,
            adaptive,
            forced_acceptance,
            *(getattr(config, name) for name in ("do_sample", "temperature", "top_k", "top_p", "min_p")),
            _repetition_penalty(config),
            tuple(eos_token_ids),
            verify_attention,
            split_kernel,
            split_verify_min_slots,
            None if draft.draft_vocab_ids is None else draft.draft_vocab_ids.numel(),
            target.config._attn_implementation,
            draft.config._attn_implementation,
            # Config values a round reads (the weights fix the others).
            draft.config.sliding_window,
            draft.config.target_kv_layer_index,
            getattr(target.config, "sliding_window", None),
            tuple(getattr(target.config, "layer_types", None) or ()),
        )
        signature = _graph_signature(draft, input_ids, settings)

    # The inputs' GPU is the current device for the call: CUDA graphs capture, and Triton launches, on the current one.
    on_device = torch.cuda.device(input_ids.device) if input_ids.is_cuda else contextlib.nullcontext()
    with (
        on_device,
        torch.no_grad(),
        _kept_round(draft, signature) as kept,
        draft.fused_for_inference(kept.fused_weights),
        triton_rms_norms(target),
    ):
        history_processors = None
        if per_node_histories:
            target._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=input_ids.device)
            # One list per row: some processors hold per-row state (the repetition penalty skips each row's
            # padding), and the engine calls them node by node, each node with its own history.
            history_processors = [
                target._get_logits_processor(
                    generation_config=config,
                    input_ids_seq_length=prompt_length,
                    encoder_input_ids=input_ids[row : row + 1],  # the row's prompt, as `target.generate` passes it
                    logits_processor=logits_processor,
                    device=input_ids.device,
                    model_kwargs={"attention_mask": attention_mask[row : row + 1]},
                )
                for row in range(input_ids.shape[0])
            ]
        call, rows, first_tokens = _prefill(
            draft,
            target,
            policy,
            config,
            input_ids,
            attention_mask,
            max_new_tokens,
            eos_token_ids,
            stopping_criteria,
            forced_acceptance,
            history_processors,
            num_slots=num_slots,
            kept=kept,
        )
        call.use_cuda_graphs = use_cuda_graphs
        cache_keys = call.target_cache.layers[0].keys
        call.split_kernel = _choose_split_kernel(split_kernel, cache_keys, split_verify)
        if split_verify_min_slots is None:
            split_verify_min_slots = SPLIT_VERIFY_MIN_SLOTS[call.split_kernel]
        # A target whose own attention cannot take the explicit mask (flash-attention) verifies split at any length.
        prefer_split = call.target_cache.num_slots >= split_verify_min_slots or (
            target.config._attn_implementation not in ("sdpa", "eager")
        )
        fused = call.split_kernel != "torch"
        call.split_verify = split_verify and (verify_attention == "split" or (fused and prefer_split))
        batch = input_ids.shape[0]
        # Room for a whole round past `max_new_tokens`: writes never collide; the excess is cut below.
        output = torch.full(
            (batch, max_new_tokens + policy.num_nodes), pad_token_id, dtype=torch.long, device=input_ids.device
        )
        output = kept.take("output", output)
        output[:, 0] = first_tokens
        feed = _StreamFeed(streamer, pad_token_id) if streamer is not None else None
        _drop(call, rows, _finished_rows(call, rows, output))
        runner = _RoundRunner(call, rows, output, kept.graphs)
        while True:
            if feed is not None:
                feed.send_final_steps(call, rows, output)
            if rows.index.numel() == 0:
                break
            result = runner.step()
            call.num_target_forwards += 1
            call.accepted.append(_scatter_rows(result.accepted.clone(), rows.index, batch))
            finished = result.finished.clone()
            if call.stopping_criteria:
                finished |= _stop_where_criteria_are_met(call, rows, output, result.count)
            any_finished = None
            if adaptive:  # the round's one host synchronisation reads both flags
                depth = call.policy.depth
                any_finished, all_accepted = torch.stack([finished.any(), (result.accepted >= depth).any()]).tolist()
                next_depth = min(depth + 2, policy.depth) if all_accepted else max(depth - 1, 1)
                call.policy = policy if next_depth == policy.depth else chain(next_depth)
            if _drop(call, rows, finished, any_finished):
                runner.invalidate()
        output = output.clone()  # the kept buffer is the next call's once this block ends
    if streamer is not None:
        streamer.end()

    generated = call.new_tokens
    width = int(generated.max()) if generated.numel() else 0
    sequences = torch.cat([input_ids, output[:, :width]], dim=1)
    beyond_end = torch.arange(width, device=sequences.device)[None] >= generated[:, None]
    sequences[:, prompt_length:] = sequences[:, prompt_length:].masked_fill(beyond_end, pad_token_id)
    if not config.return_dict_in_generate:
        return sequences
    accepted = torch.stack(call.accepted) if call.accepted else torch.empty(0, batch, dtype=torch.long)
    return GlideGenerateOutput(
        sequences=sequences,
        num_target_forwards=call.num_target_forwards,
        num_rounds=len(call.accepted),
        accepted_per_round=accepted,
        new_tokens=generated,
        tokens_per_target_forward=float(generated.sum()) / max(call.num_target_forwards, 1),
    )


def _choose_verify_attention(verify_attention: str, target) -> bool:
    """Whether the verify forward may split prefix and tree attention (`"auto"` still needs the fused kernel)."""
    if verify_attention not in ("auto", "split", "masked"):
        raise GlideConfigError(f"`verify_attention={verify_attention!r}` is not one of 'auto', 'split' or 'masked'.")
    config = target.config
    layer_types = getattr(config, "layer_types", None)
    windowed = (
        "sliding_attention" in layer_types if layer_types else getattr(config, "sliding_window", None) is not None
    )
    if windowed and verify_attention == "split":
        raise UnsupportedGenerationError(
            "`verify_attention='split'` attends to the whole prefix, but this target has sliding-window attention "
            "layers: use `verify_attention='masked'` (or 'auto')."
        )
    return verify_attention != "masked" and not windowed


def _choose_split_kernel(requested: str, cache_keys: torch.Tensor, split_verify: bool) -> str:
    """The split attention's kernel: `requested`, checked against what serves the target's cache, or the best."""
    if requested != "auto" and requested not in SPLIT_KERNELS:
        raise GlideConfigError(f"`split_kernel={requested!r}` is not one of 'auto', 'triton', 'flash' or 'torch'.")
    device, dtype, head_dim = cache_keys.device, cache_keys.dtype, cache_keys.shape[-1]
    best = split_attention_kernel(device, dtype, head_dim)
    if requested == "auto" or not split_verify:
        return best
    if not split_kernel_serves(requested, device, dtype, head_dim):
        needs = {
            "triton": "Triton installed and a CUDA target in float16, bfloat16 or float32",
            "flash": "a CUDA target in float16 or bfloat16",
        }[requested]
        raise UnsupportedGenerationError(
            f"`split_kernel={requested!r}` needs {needs} (this one: {device.type}, {dtype}, head size {head_dim}); "
            f"use `split_kernel='auto'` (here {best!r})."
        )
    return requested


def _draft_head(
    draft, kept: _KeptRound | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The draft's token ids (None: all), and the LM head rows it drafts with, gathered once per call (into `kept`'s
    buffers where it has them)."""
    kept = kept if kept is not None else _KeptRound(None)
    head = draft.get_output_embeddings()
    ids = draft.draft_vocab_ids
    linear = linear_head_weights(head)
    if ids is not None:
        ids = kept.take("draft_vocab_ids", ids.to(head_device(head) or ids.device))
    if linear is None:  # a quantized or wrapped head: `_draft_step` calls it as a module (no weight, no bias)
        return ids, None, None
    weight, bias = linear
    if ids is None:
        return None, weight, bias
    bias = None if bias is None else kept.take("draft_head_bias", bias.index_select(0, ids))
    return ids, kept.take("draft_head_weight", weight.index_select(0, ids)), bias


def _rotary_table(draft, target, num_positions: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The target's rotary (cos, sin) `[P, D]` for positions 0..P-1 in the draft's dtype, computed as a draft step
    would (the same elementwise values), so that each step gathers its rows instead of launching the rotary's own
    kernels. None when the embedding rescales with the longest position it has seen."""
    rotary = target.get_decoder().rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
        return None
    dtype = draft.get_glide_model().layer.input_layernorm.weight.dtype
    like = torch.empty(1, 1, 1, dtype=dtype, device=device)
    cos, sin = rotary(like, torch.arange(num_positions, device=device)[None])
    return cos[0], sin[0]


def _check_input_shapes(input_ids, attention_mask) -> None:
    """Token ids and mask of the form the engine reads, or an error that says what is wrong (no data read)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
        raise UnsupportedGenerationError("`input_ids` must be a non-empty `[batch, length]` tensor of token ids.")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise UnsupportedGenerationError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}.")
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape
    ):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise UnsupportedGenerationError(
            f"`attention_mask` must be a tensor of the shape of `input_ids` {tuple(input_ids.shape)}, got {shape}."
        )


def _check_input_values(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int) -> None:
    """Token ids inside the vocabulary and a 0/1 mask (one host synchronisation per call)."""
    checks = [input_ids.min(), input_ids.max()]
    if attention_mask is not None:
        checks.append(((attention_mask != 0) & (attention_mask != 1)).any().to(input_ids.dtype))
    low, high, *mask_is_not_binary = torch.stack(checks).tolist()
    if low < 0 or high >= vocab_size:
        raise UnsupportedGenerationError(
            f"`input_ids` holds ids from {low} to {high}, outside the target's vocabulary 0..{vocab_size - 1}: was "
            "it made with another model's tokenizer?"
        )
    if any(mask_is_not_binary):
        raise UnsupportedGenerationError("`attention_mask` must hold 1 for tokens and 0 for padding only.")


def _check_token_ids(eos_token_ids: list, pad_token_id, vocab_size: int) -> None:
    """End-of-sequence and padding ids inside the vocabulary (a negative id would index from the end)."""
    for name, ids in (("eos_token_id", eos_token_ids), ("pad_token_id", [pad_token_id])):
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
            shown = ids if name == "eos_token_id" else ids[0]
            raise UnsupportedGenerationError(f"`{name}` must be token ids in 0..{vocab_size - 1}, got {shown!r}.")


def _check_one_device(draft, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """The engine keeps its caches, masks and CUDA graphs on one device: the models' and the inputs'."""
    devices = {parameter.device for parameter in draft.parameters()}
    if len(devices) > 1:
        raise UnsupportedGenerationError(
            f"`draft.generate` needs the target and the draft on one device, but their weights are on "
            f"{sorted(str(device) for device in devices)} (a `device_map` across several devices, or offloading). "
            'Load the target onto one device (e.g. `device_map="cuda:0"`) and move the draft there with `.to()`.'
        )
    (device,) = devices
    if input_ids.device != device:
        raise UnsupportedGenerationError(
            f'`input_ids` is on {input_ids.device} but the models are on {device}: pass `input_ids.to("{device}")` '
            "(and the attention mask too)."
        )
    if attention_mask is not None and attention_mask.device != device:
        raise UnsupportedGenerationError(
            f"`attention_mask` is on {attention_mask.device} but the models and `input_ids` are on {device}: pass "
            f'`attention_mask.to("{device}")`.'
        )


def _check_policy_fits(policy: TreePolicy, vocab_size: int) -> None:
    """Each level can only hold as many nodes as its fed parents have distinct children."""
    parents = 1
    for level, width in enumerate(policy.widths, start=1):
        if width > parents * vocab_size:
            setting = "cape_bins" if policy.kind == "cape" else "tree_widths"
            raise GlideConfigError(
                f"`{setting}` asks for {width} nodes at level {level}, but its {parents} expanded parent(s) have "
                f"only {parents * vocab_size} distinct children with a (draft) vocabulary of {vocab_size}."
            )
        parents = policy.expand[level - 1]


def _as_list(token_ids) -> list[int]:
    if token_ids is None:
        return []
    if isinstance(token_ids, torch.Tensor):
        return token_ids.flatten().tolist()
    return list(token_ids) if isinstance(token_ids, (list, tuple)) else [token_ids]  # checked by _check_token_ids


def _prefill(
    draft,
    target,
    policy,
    config,
    input_ids,
    attention_mask,
    max_new_tokens,
    eos_token_ids,
    stopping_criteria,
    forced_acceptance,
    history_processors=None,
    num_slots: int | None = None,
    kept: _KeptRound | None = None,
):
    """Run the target over the prompts, fill both caches and sample each row's first new token. The target cache
    has `num_slots` slots (default: as many as the call can write); the caches and the call's tensors are `kept`'s
    where it has them."""
    device = input_ids.device
    batch, prompt_length = input_ids.shape
    if num_slots is None:
        num_slots = _slots_needed(prompt_length, max_new_tokens, policy)
    kept = kept if kept is not None else _KeptRound(None)
    # Left-align every row (padding last): row b then occupies slots 0..length_b - 1 of every cache.
    order = torch.sort((attention_mask == 0).long(), dim=1, stable=True).indices
    aligned = input_ids.gather(1, order)
    lengths = attention_mask.long().sum(-1)
    aligned_mask = (torch.arange(prompt_length, device=device)[None] < lengths[:, None]).long()
    if bool((lengths == 0).any()):
        raise UnsupportedGenerationError("Every prompt needs at least one token (a row of `attention_mask` is all 0).")

    target_config = target.config
    num_layers = target_config.num_hidden_layers
    # Full layers even for sliding-window targets: the prefill's masks apply the window, the caches keep every key.
    prefill_cache = Cache(layers=[DynamicLayer() for _ in range(num_layers)])
    positions = torch.arange(prompt_length, device=device)[None].expand(batch, -1)
    hidden = target.get_decoder()(
        input_ids=aligned, attention_mask=aligned_mask, position_ids=positions, cache=prefill_cache, use_cache=True
    ).last_hidden_state
    last_hidden = hidden.gather(1, (lengths - 1)[:, None, None].expand(-1, 1, hidden.shape[-1]))
    first_logits = target.get_output_embeddings()(last_hidden).float()  # [B, 1, V]

    keys = prefill_cache.layers[0].keys
    if kept.target_cache is None:
        kept.target_cache = SlotCache.allocate(
            num_layers, batch, keys.shape[1], num_slots, keys.shape[-1], keys.dtype, device
        )
    target_cache = kept.target_cache
    for slot_layer, layer in zip(target_cache.layers, prefill_cache.layers):
        slot_layer.keys[:, :, :prompt_length] = layer.keys
        slot_layer.values[:, :, :prompt_length] = layer.values
    del prefill_cache

    window = draft.config.sliding_window
    if kept.draft_cache is None:
        kept.draft_cache = DraftRingCache.allocate_ring(
            batch,
            draft.config.num_key_value_heads,
            window + RING_SLACK,
            policy.num_nodes,
            draft.config.head_dim,
            draft.model.layer.self_attn.k_proj.weight.dtype,
            device,
        )
    draft_cache = kept.draft_cache
    draft_cache.reset()
    # The draft's prompt: only the keys/values of the last `window` tokens, the only ones later steps can see.
    span = min(window, prompt_length)
    draft_positions = lengths[:, None] - span + torch.arange(span, device=device)[None]  # [B, span]
    present = draft_positions >= 0
    draft_tokens = aligned.gather(1, draft_positions.clamp(min=0))
    draft_keys, draft_values = draft.model.self_attention_key_value(draft_tokens, draft_positions.clamp(min=0))
    slots = draft_cache.ring_slots(draft_positions)
    draft_cache.set_write_slots(slots)
    draft_cache.layers[0].update(draft_keys, draft_values)
    draft_cache.record_positions(slots, torch.where(present, draft_positions, -1))

    rows = _Rows(
        index=kept.take("index", torch.arange(batch, device=device)),
        lengths=kept.take("lengths", lengths),
        roots=kept.take("roots", torch.zeros(batch, dtype=torch.long, device=device)),
        previous=kept.take("previous", aligned.gather(1, (lengths - 1)[:, None])[:, 0]),
        generated=kept.take("generated", torch.zeros(batch, dtype=torch.long, device=device)),
    )
    call = _Call(
        draft=draft,
        target=target,
        policy=policy,
        config=config,
        warpers=build_warpers(config),
        eos_token_ids=eos_token_ids,
        max_new_tokens=max_new_tokens,
        min_new_tokens=config.min_new_tokens or 0,
        target_cache=target_cache,
        draft_cache=draft_cache,
        stopping_criteria=stopping_criteria,
        forced_acceptance=forced_acceptance,
        prompts=input_ids,
        num_target_forwards=1,
        new_tokens=torch.zeros(batch, dtype=torch.long, device=device),
        eos_tensor=kept.take("eos", torch.tensor(eos_token_ids, dtype=torch.long, device=device)),
        cape_bins=kept.take("cape_bins", torch.tensor(policy.cape_bins, dtype=torch.long, device=device))
        if policy.cape_bins
        else None,
        use_cuda_graphs=False,
        split_verify=False,
        split_kernel="torch",
        history_processors=history_processors,
        repetition_penalty=None if history_processors is not None else _repetition_penalty(config),
        # Made here, not in the first round: a tensor created inside a captured round is re-made at every replay.
        forced_rounds=None
        if forced_acceptance is None
        else kept.take("forced_rounds", torch.zeros((), dtype=torch.float64, device=device)),
    )
    call.draft_vocab_ids, call.draft_head_weight, call.draft_head_bias = _draft_head(draft, kept)
    rotary_table = _rotary_table(draft, target, num_slots + policy.depth + 1, device)
    if rotary_table is not None:
        call.rotary_table = (kept.take("rotary_cos", rotary_table[0]), kept.take("rotary_sin", rotary_table[1]))
    root_tree = DraftTree.start(rows.roots, 1)
    if history_processors is not None:
        first_logits = torch.cat(
            [
                processors(input_ids[row : row + 1], first_logits[row])
                for row, processors in enumerate(history_processors)
            ]
        )[:, None]
        first = verify_tree(root_tree, first_logits, [], config.do_sample, max_depth=0)
    else:
        if call.repetition_penalty is not None:
            # The prompt's tokens as Transformers' processor counts them: from each row's first attended token on
            # (leading padding skipped, later masked tokens counted); skipped ones repeat that first token.
            first_attended = (attention_mask != 0).int().argmax(dim=1, keepdim=True)  # [B, 1]
            anchor = input_ids.gather(1, first_attended)
            counted = torch.arange(prompt_length, device=device)[None] >= first_attended
            tokens = torch.where(counted, input_ids, anchor)
            rows.seen = kept.take("seen", torch.zeros(batch, first_logits.shape[-1], dtype=torch.bool, device=device))
            rows.seen.scatter_(1, tokens, True)
            first_logits = apply_repetition_penalty(
                first_logits, rows.seen, anchor[:, :, None], call.repetition_penalty
            )
        suppress = (rows.generated < call.min_new_tokens)[:, None]
        first = verify_tree(root_tree, first_logits, call.warpers, config.do_sample, suppress, call.eos_tensor, 0)
    rows.roots.copy_(first.next_token)
    if rows.seen is not None:
        rows.seen.scatter_(1, first.next_token[:, None], True)
    rows.generated += 1
    return call, rows, first.next_token


def _slots_needed(prompt_length: int, max_new_tokens: int, policy: TreePolicy) -> int:
    """The target cache's slots for a call: the prompt, the new tokens, one round's tree and one more."""
    return prompt_length + max_new_tokens + policy.num_nodes + 1


def _repetition_penalty(config: GenerationConfig) -> float | None:
    penalty = config.repetition_penalty
    return None if penalty is None or penalty == 1.0 else float(penalty)


@dataclass
class _RoundResult:
    """What one round leaves for the host: `[B, depth + 1]` new tokens (the first `count` are real), the drafts
    accepted, and which rows finished (end-of-sequence or `max_new_tokens`)."""

    new_tokens: torch.Tensor
    count: torch.Tensor
    accepted: torch.Tensor
    finished: torch.Tensor


class _RoundRunner:
    """Runs rounds eagerly, or as one captured CUDA graph per batch shape.

    A whole round has static shapes (rows, tree nodes, cache slots) and no host synchronisation, so on CUDA it is
    captured once and then replayed: one launch instead of hundreds of small kernels and Python calls. Dropping
    finished rows changes the shapes: the graphs are then captured again. A chain whose length the heuristic schedule
    changes gets one graph per length.

    Before its first capture a round runs once eagerly on a side stream, as CUDA graph capture asks (libraries and
    kernels initialise lazily on first use, which capture does not allow). That warm-up costs about four replayed
    rounds, so it is done once per code path (`_round_code_path`) per draft, not once per `generate` call: the draft
    remembers the paths it has warmed.

    Warm-up and capture run on a stream of the round's own device. (`torch.cuda.graph`'s default capture stream is
    made once per process, on the device current at its first use: a round on another GPU captured there would
    launch its kernels on the wrong device.)
    """

    def __init__(self, call: _Call, rows: _Rows, output: torch.Tensor, graphs: dict) -> None:
        self.call, self.rows, self.output = call, rows, output
        # One graph per tree shape (a chain's length changes under the heuristic schedule), with its result: at
        # first the kept round's (`_KeptRound.graphs`), captured by an earlier call on the same buffers.
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, _RoundResult]] = graphs
        self.warm: set[int] = set()
        self.side_stream: torch.cuda.Stream | None = None  # made at the first warm-up or capture, on the round's GPU
        self.warm_code_paths: set = engine_state(call.draft).warm_code_paths

    def invalidate(self) -> None:
        self.graphs, self.warm = {}, set()

    def step(self) -> _RoundResult:
        if not self.call.use_cuda_graphs:
            return _round(self.call, self.rows, self.output)
        shape = self.call.policy.num_nodes
        if shape in self.graphs:
            graph, result = self.graphs[shape]
            graph.replay()
            return result
        device = self.rows.lengths.device
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream(device)
        code_path = _round_code_path(self.call)
        if shape not in self.warm and code_path not in self.warm_code_paths:  # warm up on a side stream
            self.side_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.side_stream):
                result = _round(self.call, self.rows, self.output)
            torch.cuda.current_stream(device).wait_stream(self.side_stream)
            self.warm.add(shape)
            self.warm_code_paths.add(code_path)
            return result
        _compile_triton_kernels(self.call, self.rows)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.side_stream):
            result = _round(self.call, self.rows, self.output)
        self.graphs[shape] = (graph, result)
        graph.replay()
        return result


def _compile_triton_kernels(call: _Call, rows: _Rows) -> None:
    """Launch the round's Triton attention kernels once, eagerly, with the sizes of the round about to be captured:
    the target's split verify attention, and the draft's cross-attention for each number of tokens a draft step of
    the round feeds (2 at the root, then each level's width).

    Triton compiles a kernel for each new specialization of its arguments (its tiling, sizes equal to 1 or divisible
    by 16), and loading a compiled kernel is not allowed while a stream is being captured on every driver. A round
    captured without a warm-up (a later call, another prompt length or tree size) may need a new one: this makes
    sure it exists. Only reads the caches; the outputs are thrown away. (The Triton RMSNorms see the same sizes in
    every forward, the prefill's included.)
    """
    batch, device = rows.lengths.shape[0], rows.lengths.device
    if call.split_verify and call.split_kernel == "triton":
        layer = call.target_cache.layers[0]
        num_nodes = call.policy.num_nodes
        num_heads, head_dim = call.target.config.num_attention_heads, layer.keys.shape[-1]
        # The layout Transformers' attention hands over: [B, N, Hq, D] transposed to [B, Hq, N, D].
        query = layer.keys.new_zeros(batch, num_nodes, num_heads, head_dim).transpose(1, 2)
        node_slots = rows.lengths[:, None] + torch.arange(num_nodes, device=device)[None]
        itself = torch.eye(num_nodes, dtype=torch.bool, device=device)[None].expand(batch, -1, -1)
        inputs = TreeAttentionInputs.build(rows.lengths, node_slots, itself, call.target_cache.num_slots, "triton")
        tree_attention_forward(None, query, layer.keys, layer.values, None, glide_tree=inputs)
    draft_layer = call.draft.get_glide_model().layer
    cross = draft_layer.cross_attn
    target_layer = call.target_cache.layers[call.draft.config.target_kv_layer_index]
    draft_dtype = draft_layer.input_layernorm.weight.dtype
    keys, values = target_layer.keys.to(draft_dtype), target_layer.values.to(draft_dtype)
    if cross.use_triton_kernel and prefix_attention_serves(keys):
        num_heads = call.draft.config.num_attention_heads
        for width in sorted({2, *call.policy.expand[: call.policy.depth - 1]}):
            query = keys.new_zeros(batch, width, num_heads, keys.shape[-1]).transpose(1, 2)
            prefix_attention(query, keys, values, rows.lengths, cross.scaling)


def _round_code_path(call: _Call) -> tuple:
    """What decides which kernels and libraries a round uses (its shapes aside): one warm-up round per value."""
    return (
        str(call.eos_tensor.device),
        call.target_cache.layers[0].keys.dtype,  # dtypes: Triton and cuBLAS pick kernels per dtype
        next(call.draft.get_glide_model().layer.parameters()).dtype,
        call.target.config._attn_implementation,
        call.policy.kind,
        call.config.do_sample,
        tuple(type(warper).__name__ for warper in call.warpers),  # top-k, top-p, ... launch their own kernels
        call.split_verify,
        call.split_kernel,
        call.repetition_penalty is not None,
        call.draft_vocab_ids is not None,
        call.draft_head_weight is None,
        call.forced_acceptance is not None,
    )


def _round(call: _Call, rows: _Rows, output: torch.Tensor) -> _RoundResult:
    """One draft-verify-accept round for the running rows, on the device only (no host synchronisation)."""
    target, policy = call.target, call.policy
    batch, device = rows.lengths.shape[0], rows.lengths.device
    ring = call.draft_cache

    # 1. Draft: the root step, then one forward per tree level.
    ring.clear_tree(rows.lengths)
    tree = DraftTree.start(rows.roots, policy.num_nodes)
    positions = torch.stack([rows.lengths - 1, rows.lengths], dim=1)
    logits = _draft_step(
        call,
        torch.stack([rows.previous, rows.roots], dim=1),
        positions,
        ring.ring_slots(positions),
        None,
        tree,
        rows.lengths,
    )[:, -1:]
    fed = torch.zeros(batch, 1, dtype=torch.long, device=device)  # tree nodes whose draft logits we hold
    # A sampled chain draws its tokens from the draft (standard speculative sampling); trees, CAPE and greedy
    # decoding choose them deterministically (see sampling.py).
    sampled_chain = policy.kind == "chain" and call.config.do_sample
    draft_probs = []
    for level in range(1, policy.depth + 1):
        if sampled_chain:
            probs = torch.softmax(call.warpers(None, logits[:, -1].float()), dim=-1)  # [B, V] (or draft vocab)
            tokens = sample(probs)[:, None]
            parent_local, valid = torch.zeros_like(tokens), torch.ones_like(tokens, dtype=torch.bool)
            scores = tree.scores.gather(1, fed) + probs.gather(1, tokens).log()
            if call.draft_vocab_ids is not None:  # speculative sampling compares q and p over the whole vocabulary
                probs = torch.zeros(batch, call.target.config.vocab_size, device=device).index_copy_(
                    1, call.draft_vocab_ids, probs
                )
                tokens = call.draft_vocab_ids[tokens]
            draft_probs.append(probs)
        else:
            logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # the upcast fused in
            parent_local, tokens, scores, valid = policy.select(
                level, logprobs, tree.scores.gather(1, fed), call.cape_bins
            )
            if call.draft_vocab_ids is not None:
                tokens = call.draft_vocab_ids[tokens]
        start = policy.level_start(level)
        tree.add_level(start, fed.gather(1, parent_local), tokens, scores, valid)
        if level == policy.depth:
            break
        width = policy.expand[level - 1]
        fed = torch.arange(start, start + width, device=device)[None].expand(batch, -1)
        level_positions = (rows.lengths[:, None] + level).expand(-1, width)
        logits = _draft_step(call, tokens[:, :width], level_positions, ring.tree_slot(fed), fed, tree, rows.lengths)

    # 2. Verify every node in one target forward.
    node_slots = rows.lengths[:, None] + torch.arange(policy.num_nodes, device=device)[None]
    call.target_cache.set_write_slots(node_slots)
    node_positions = rows.lengths[:, None] + tree.depths
    if call.split_verify:
        tree_inputs = TreeAttentionInputs.build(
            rows.lengths, node_slots, tree.ancestors, call.target_cache.num_slots, call.split_kernel
        )
        with using_tree_attention(target.config):  # the 4D mask only stops Transformers from building its own
            target_logits = target(
                input_ids=tree.tokens,
                position_ids=node_positions,
                attention_mask=tree.ancestors[:, None],
                cache=call.target_cache,
                use_cache=True,
                **{TREE_ATTENTION: tree_inputs},
            ).logits
    else:
        target_logits = target(
            input_ids=tree.tokens,
            position_ids=node_positions,
            attention_mask=_verify_mask(call, rows, tree),
            cache=call.target_cache,
            use_cache=True,
        ).logits

    # 3. Accept.
    if call.history_processors is not None:
        processed = _process_with_histories(call, rows, output, tree, target_logits)
    else:
        if call.repetition_penalty is not None:
            target_logits = apply_repetition_penalty(
                target_logits.float(), rows.seen, _path_tokens(tree, rows.roots, policy.depth), call.repetition_penalty
            )
        suppress = (rows.generated[:, None] + tree.depths) < call.min_new_tokens
        processed = process_target_logits(
            target_logits, call.warpers, call.config.do_sample, suppress, call.eos_tensor
        )
    if sampled_chain:
        verdict = verify_sampled_chain(tree, torch.softmax(processed, dim=-1), torch.stack(draft_probs, dim=1))
    else:
        verdict = verify_tree(tree, processed, [], call.config.do_sample, max_depth=policy.depth)
    if call.forced_acceptance is not None:  # benchmark only: pretend the first k drafts matched
        rounds, rate = call.forced_rounds, call.forced_acceptance
        verdict.num_accepted.copy_(((rounds + 1) * rate).floor().long() - (rounds * rate).floor().long())
        call.forced_rounds.add_(1)
        verdict.path = torch.arange(policy.depth + 1, device=device)[None].expand(batch, -1).contiguous()
        verdict.next_token = tree.tokens[:, -1]
    accepted = verdict.num_accepted

    # 4. Compact: accepted nodes to contiguous slots in every target layer, and their draft keys into the ring.
    depth_grid = torch.arange(policy.depth + 1, device=device)[None]
    on_path = depth_grid <= accepted[:, None]
    destination = rows.lengths[:, None] + depth_grid
    if policy.kind != "chain":  # a chain's node d already sits at slot length + d: nothing to move
        source = torch.where(on_path, rows.lengths[:, None] + verdict.path, destination)
        call.target_cache.move_slots(source, destination)
    ring_destination = ring.ring_slots(destination[:, 1:])
    ring.move_slots(
        torch.where(on_path[:, 1:], ring.tree_slot(verdict.path[:, 1:]), ring_destination), ring_destination
    )
    kept_positions = ring.slot_positions.gather(1, ring_destination)
    ring.record_positions(ring_destination, torch.where(on_path[:, 1:], destination[:, 1:], kept_positions))

    # 5. Append: the accepted drafts, then the target's next token.
    path_tokens = tree.tokens.gather(1, verdict.path)  # [B, depth + 1], root first
    new_tokens = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], dim=1)
    new_tokens.scatter_(1, accepted[:, None], verdict.next_token[:, None])
    count = _append(call, rows, output, new_tokens, accepted + 1)
    if rows.seen is not None:  # the appended tokens join every later node's history (others repeat the first)
        appended = torch.arange(new_tokens.shape[1], device=device)[None] < count[:, None]
        rows.seen.scatter_(1, torch.where(appended, new_tokens, new_tokens[:, :1]), True)
    rows.previous.copy_(path_tokens.gather(1, accepted[:, None])[:, 0])
    rows.roots.copy_(verdict.next_token)
    rows.lengths.add_(accepted + 1)
    return _RoundResult(new_tokens, count, accepted, _finished_rows(call, rows, output, with_criteria=False))


def _path_tokens(tree: DraftTree, roots: torch.Tensor, depth: int) -> torch.Tensor:
    """Each node's own tokens below the root, one per depth `[B, N, max(depth, 1)]`, padded with the row's root."""
    columns = []
    for level in range(1, max(depth, 1) + 1):
        on_level = tree.ancestors & (tree.depths == level)[:, None, :]  # [B, N, N]: the node's ancestor at `level`
        ancestor = on_level.to(torch.uint8).argmax(dim=-1)
        columns.append(torch.where(on_level.any(dim=-1), tree.tokens.gather(1, ancestor), roots[:, None]))
    return torch.stack(columns, dim=-1)


def _process_with_histories(call: _Call, rows: _Rows, output: torch.Tensor, tree: DraftTree, logits: torch.Tensor):
    """Apply Transformers' processor list to every node's logits with that node's own history: the prompt (padding
    as given), the tokens generated so far (the root last), then the node's ancestors below the root. Runs on the
    host, node by node: the slow path, taken only for history-dependent settings."""
    processed = logits.float().clone()
    ancestors, tokens, valid = tree.ancestors.cpu(), tree.tokens.cpu(), tree.valid.cpu()
    below_root = tree.depths.cpu() > 0
    generated = rows.generated.cpu()
    for row in range(rows.index.shape[0]):
        original = int(rows.index[row])
        processors = call.history_processors[original]
        history = torch.cat([call.prompts[original].cpu(), output[original, : int(generated[row])].cpu()])
        for node in valid[row].nonzero().squeeze(-1).tolist():
            # Node indices grow level by level, so a node's ancestors in index order are in depth order.
            node_ids = torch.cat([history, tokens[row][ancestors[row, node] & below_root[row]]])[None]
            processed[row, node] = processors(node_ids.to(logits.device), processed[row, node][None])[0]
    return processed


def _draft_step(call, tokens, positions, slots, query_nodes, tree, target_lengths) -> torch.Tensor:
    """Feed `tokens` `[B, Q]` through the draft at `positions`, storing their keys at `slots`; return logits (in the
    LM head's dtype: the callers upcast them in their first op). Row b of the draft sees the first
    `target_lengths[b]` slots of the target cache (its verified prefix)."""
    ring = call.draft_cache
    ring.set_write_slots(slots)
    ring.record_positions(slots, positions)
    slot_positions = ring.slot_positions  # [B, R + N]
    window = call.draft.config.sliding_window
    query_positions = positions[:, :, None]
    visible = (slot_positions[:, None, :] >= 0) & (slot_positions[:, None, :] <= query_positions)
    visible &= slot_positions[:, None, :] > query_positions - window
    if query_nodes is None:
        visible &= ring.is_ring_slot
    else:
        node_rows = tree.ancestors.gather(1, query_nodes[:, :, None].expand(-1, -1, tree.ancestors.shape[-1]))
        tree_visible = torch.zeros_like(visible)
        tree_visible[:, :, ring.ring_size : ring.ring_size + node_rows.shape[-1]] = node_rows
        visible &= ring.is_ring_slot | tree_visible
    mask = _attention_mask(visible[:, None], call.draft.config._attn_implementation, torch.float32)
    if call.rotary_table is not None:
        cos, sin = call.rotary_table
        position_embeddings = (cos[positions], sin[positions])
    else:
        position_embeddings = None
    hidden = call.draft.model(
        input_ids=tokens,
        position_ids=positions,
        position_embeddings=position_embeddings,
        attention_mask=mask,
        cache=ring,
        use_cache=True,
        target_cache=call.target_cache,
        target_lengths=target_lengths,
    ).last_hidden_state
    weight = call.draft_head_weight
    if weight is None:  # a quantized or wrapped LM head: the whole vocabulary, then the draft's own columns
        logits = head_logits(hidden, call.draft.get_output_embeddings())
        return logits if call.draft_vocab_ids is None else logits.index_select(-1, call.draft_vocab_ids)
    hidden = hidden.to(device=weight.device, dtype=weight.dtype)
    return torch.nn.functional.linear(hidden, weight, call.draft_head_bias)


def _verify_mask(call: _Call, rows: _Rows, tree: DraftTree):
    """The target's mask for the verify forward: each node sees its row's prefix and its own ancestors."""
    num_slots, num_nodes = call.target_cache.num_slots, tree.tokens.shape[1]
    device = rows.lengths.device
    slot = torch.arange(num_slots, device=device)[None]  # [1, S]
    offset = slot - rows.lengths[:, None]  # [B, S], node index for tree slots
    in_tree = (offset >= 0) & (offset < num_nodes)
    node_of_slot = offset.clamp(0, num_nodes - 1)
    tree_columns = tree.ancestors.gather(2, node_of_slot[:, None, :].expand(-1, num_nodes, -1))  # [B, N, S]
    visible = (offset < 0)[:, None, :] | (tree_columns & in_tree[:, None, :])
    key_positions = torch.where(offset < 0, slot, rows.lengths[:, None] + tree.depths.gather(1, node_of_slot))
    query_positions = rows.lengths[:, None] + tree.depths  # [B, N]
    target_config = call.target.config
    dtype = next(call.target.parameters()).dtype
    implementation = target_config._attn_implementation

    def windowed(window):
        if window is None:
            return _attention_mask(visible[:, None], implementation, dtype)
        inside = key_positions[:, None, :] > query_positions[:, :, None] - window
        return _attention_mask((visible & inside)[:, None], implementation, dtype)

    layer_types = getattr(target_config, "layer_types", None)
    window = getattr(target_config, "sliding_window", None)
    if layer_types:
        return {kind: windowed(window if kind == "sliding_attention" else None) for kind in set(layer_types)}
    return windowed(window)


def _attention_mask(visible: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean visibility mask in the form an attention implementation takes."""
    if implementation == "sdpa":
        return visible
    if implementation == "eager":
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(dtype).min
        )
    raise UnsupportedGenerationError(
        f"The GLIDE engine verifies trees with explicit masks, which `attn_implementation={implementation!r}` cannot "
        "take; load the target and the draft with `attn_implementation='sdpa'` (or 'eager')."
    )


def _append(call: _Call, rows: _Rows, output: torch.Tensor, new_tokens: torch.Tensor, count: torch.Tensor):
    """Write each row's first `count` new tokens, cut at end-of-sequence and at `max_new_tokens`."""
    width = new_tokens.shape[1]
    column = torch.arange(width, device=new_tokens.device)[None]
    if call.eos_token_ids:
        is_eos = torch.isin(new_tokens, call.eos_tensor)
        first_eos = torch.where(is_eos & (column < count[:, None]), column, width).min(-1).values
        count = torch.minimum(count, first_eos + 1)
    count = torch.minimum(count, call.max_new_tokens - rows.generated)
    write = column < count[:, None]
    target_columns = rows.generated[:, None] + column
    current = output[rows.index[:, None], target_columns]
    output[rows.index[:, None], target_columns] = torch.where(write, new_tokens, current)
    rows.generated.add_(count)
    return count


def _finished_rows(call: _Call, rows: _Rows, output: torch.Tensor, with_criteria: bool = True) -> torch.Tensor:
    """Rows that reached `max_new_tokens`, produced end-of-sequence, or (`with_criteria`) met a stopping
    criterion."""
    done = rows.generated >= call.max_new_tokens
    if call.eos_token_ids:
        last = output[rows.index, (rows.generated - 1).clamp(min=0)]
        done |= torch.isin(last, call.eos_tensor)
    if with_criteria and call.stopping_criteria:  # on each row's newest token
        done |= _stop_where_criteria_are_met(call, rows, output, torch.ones_like(rows.generated))
    return done


def _stop_where_criteria_are_met(call: _Call, rows: _Rows, output: torch.Tensor, count: torch.Tensor):
    """Rows whose stopping criteria fire at one of this round's `count` new tokens, each cut back to the first such
    token. Checked as `target.generate` checks them, after every token, and on each row's own sequence (its prompt
    as given, then its tokens so far): rows advance by different numbers of tokens in a round, so no one batch holds
    every row at each of its lengths. Runs on the host, row by row."""
    prompt_width = call.prompts.shape[1]
    ends, counts, originals = rows.generated.tolist(), count.tolist(), rows.index.tolist()  # one synchronisation
    fired = []
    for row, (end, new, original) in enumerate(zip(ends, counts, originals)):
        sequence = torch.cat([call.prompts[original], output[original, :end]])[None]
        first = next(
            (
                length
                for length in range(end - new + 1, end + 1)
                if _criteria_met(call, sequence[:, : prompt_width + length])
            ),
            None,
        )
        if first is not None:
            rows.generated[row] = first
        fired.append(first is not None)
    return torch.tensor(fired, dtype=torch.bool, device=rows.generated.device)


def _criteria_met(call: _Call, sequence: torch.Tensor) -> bool:
    """Whether the stopping criteria fire on one row's `sequence` `[1, L]`."""
    try:
        met = call.stopping_criteria(sequence, None)
    except (RuntimeError, TypeError, ValueError) as error:  # e.g. a criterion's result of another shape
        raise UnsupportedGenerationError(
            f"A stopping criterion failed on a sequence `[1, {sequence.shape[1]}]` (the engine checks each row on "
            f"its own: its prompt and its tokens so far): {error}"
        ) from error
    met = torch.as_tensor(met).reshape(-1) if met is not None else None
    if met is None or met.numel() != 1 or met.is_floating_point():
        raise UnsupportedGenerationError(
            "A stopping criterion must return one bool per row (a `[batch]` bool tensor, as Transformers' "
            f"`StoppingCriteria` do), got {met if met is None else tuple(met.shape)} for one row."
        )
    return bool(met)


class _StreamFeed:
    """Gives a streamer what `target.generate` gives it: after the prompt, one `[batch]` tensor per step with each
    row's token of that step (`pad_token_id` once the row has finished). A row's tokens are final once it has them
    (end-of-sequence and stopping criteria cut a round back before), so step `s` goes out once every running row
    holds more than `s` tokens."""

    def __init__(self, streamer, pad_token_id: int) -> None:
        self.streamer, self.pad_token_id, self.sent = streamer, pad_token_id, 0

    def send_final_steps(self, call: _Call, rows: _Rows, output: torch.Tensor) -> None:
        counts = call.new_tokens.clone()  # finished rows: their final count
        counts[rows.index] = rows.generated
        running = torch.zeros_like(counts, dtype=torch.bool)
        running[rows.index] = True
        counts, running = counts.tolist(), running.tolist()
        running_counts = [count for count, is_running in zip(counts, running) if is_running]
        final = min(running_counts) if running_counts else max(counts, default=0)
        if final <= self.sent:
            return
        steps = output[:, self.sent : final].cpu()
        within = torch.arange(self.sent, final)[None] < torch.tensor(counts)[:, None]
        steps = steps.masked_fill(~within, self.pad_token_id)
        for column in steps.unbind(dim=1):
            self.streamer.put(column)
        self.sent = final


def _drop(call: _Call, rows: _Rows, finished: torch.Tensor, any_finished: bool | None = None) -> bool:
    """Remove finished rows from the batch and from both caches (the round's one host synchronisation, unless the
    caller read `any_finished` already); returns whether any row left."""
    if not (bool(finished.any()) if any_finished is None else any_finished):
        return False
    call.new_tokens[rows.index[finished]] = rows.generated[finished]
    keep = (~finished).nonzero().squeeze(-1)
    rows.select(keep)
    call.target_cache = call.target_cache.selected(keep)
    call.draft_cache = call.draft_cache.selected(keep)
    return True


def _scatter_rows(values: torch.Tensor, index: torch.Tensor, batch: int) -> torch.Tensor:
    full = torch.full((batch,), -1, dtype=values.dtype, device=values.device)
    return full.index_copy(0, index, values)
