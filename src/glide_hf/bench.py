"""`glide-hf bench`: acceptance and speed of every speculative decoding method for a (target, draft) pair.

Methods, each one generation call per prompt at batch size 1 (see `batch_size` below for the exceptions):

| name                   | call                                                                            |
| ---------------------- | ------------------------------------------------------------------------------- |
| `vanilla`              | `target.generate(ids)`                                                          |
| `glide_assisted`       | `target.generate(ids, assistant_model=draft)`: Transformers' assisted decoding |
| `independent_assisted` | `target.generate(ids, assistant_model=assistant)`: an ordinary small causal LM |
| `prompt_lookup`        | `target.generate(ids, prompt_lookup_num_tokens=k)`                              |
| `engine_chain`, `engine_tree`, `engine_cape` | `draft.generate(ids, draft_strategy=...)`: glide_hf's engine |
| `engine_adaptive`      | `draft.generate(ids, num_draft_tokens_schedule="heuristic")`: an adaptive chain  |

Measured for each method and temperature (0 means greedy):
- tau: new tokens over target forward passes, the prefill included, summed over the prompts. The stock paths count
  the target's `forward` calls with a pre-hook (`count_forward_calls`); the engine reports its own count, since its
  rounds replay as CUDA graphs, which call no `forward`.
- tokens/s: new tokens over wall-clock seconds, the device synchronised around each call, after one warm-up call
  per method; speedup: over `vanilla` at the same temperature.
- greedy exactness: each method's greedy continuation against `vanilla`'s, prompt by prompt (all methods here are
  lossless, so they must agree; a disagreement is reported with the target's top-2 logit gap at that token, which
  tells a floating-point tie from a bug).
- looping: the share of continuations whose last half is one block of tokens repeated (`is_looping`).

With `workers > 0`, the calls are spread over worker processes that share the device, each with its own copies of
the models (`ModelSpec` says how to load them): tau, outputs and loops come from that pass, and speed from a second
pass in this process alone on the first `timing_prompts` prompts, because calls that share a device slow each other
down. Both passes stop at `deadline`; only prompts that every method finished are reported.

With `batch_size > 1`, the tau pass runs the engine methods and sampled vanilla on groups of `batch_size` prompts,
left-padded into one call (`BatchJob`, `generate_batch_continuations`); speed then always comes from the timing pass
at batch 1. What is measured stays per prompt: a row's tokens are its own, its target forwards are those a batch-1
call would count (the engine: the prefill and the rounds the row took part in; vanilla: one per new token). The
engine computes each row at its own positions (it moves padding behind the prompt), and on the tiny fp32 CPU models
of the tests its rows equal batch-1 calls exactly (`tests/test_bench.py`). Vanilla greedy, the reference of the
exactness check, stays at batch 1 on purpose: a padded batch runs other matmul shapes, so it may break a
floating-point tie differently from what a user's batch-1 `generate` returns, and a reference must not carry that
doubt; it is also cheap (one target forward per token, no draft: ~1.7 s per 256-token call on an H200 for the
32M-parameter self-trained target, against 3-5 s for a stock assisted call). At a temperature above 0 each row is
an independent sample, seeded per batch instead of per prompt. The stock assisted paths and prompt lookup always run
at batch 1: Transformers' assisted decoding accepts no larger batch.

`benchmarks/selftrained/run.py` runs `evaluate` on its self-trained models; `run_cli` is the command. What this file
leaves to others: decoding itself (`engine.py`, Transformers' `generate`), the models (`modeling_glide.py`).
"""

import dataclasses
import importlib.util
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, PreTrainedModel
from transformers.utils import logging

from .cli import cli_logging
from .configuration_glide import GlideConfig
from .errors import DataFormatError, DataNotFoundError, EmptyDatasetError, GlideConfigError
from .modeling_glide import GlideForCausalLM

logger = logging.get_logger(__name__)

Method = Literal[
    "vanilla",
    "glide_assisted",
    "independent_assisted",
    "prompt_lookup",
    "engine_chain",
    "engine_adaptive",
    "engine_tree",
    "engine_cape",
]
METHODS: tuple[str, ...] = get_args(Method)
METHOD_LABELS = {
    "vanilla": "vanilla `target.generate`",
    "glide_assisted": "assisted, GLIDE draft",
    "independent_assisted": "assisted, independent draft",
    "prompt_lookup": "prompt lookup",
    "engine_chain": "engine, chain",
    "engine_adaptive": "engine, adaptive chain",
    "engine_tree": "engine, tree",
    "engine_cape": "engine, CAPE",
}
DRAFT_METHODS = frozenset({"glide_assisted", "engine_chain", "engine_adaptive", "engine_tree", "engine_cape"})
ASSISTANT_METHODS = frozenset({"independent_assisted"})
ENGINE_STRATEGIES = {"engine_chain": "chain", "engine_adaptive": "chain", "engine_tree": "tree", "engine_cape": "cape"}
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A continuation shorter than this is never called looping: too short to tell a loop from a repeated token.
MIN_LOOP_CHECK_TOKENS = 16
# New tokens of the untimed warm-up call before a method's timed calls (first-call set-up, CUDA graph pools).
WARMUP_NEW_TOKENS = 16
# Greedy mismatches whose target logit gap is measured (one target forward each).
MAX_DIAGNOSED_MISMATCHES = 20


# --- models --------------------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """Where the models are and how to load them; plain data, so that worker processes load their own copies.

    Args:
        target (`str`): the target's folder or Hub id.
        draft (`str`, *optional*): a GLIDE draft's folder or Hub id (its target is `target`, shared).
        assistant (`str`, *optional*): an ordinary causal LM for `independent_assisted`.
        dtype (`str`): `"auto"` (bfloat16 on CUDA, float32 elsewhere), `"float32"`, `"bfloat16"` or `"float16"`;
            for every model.
        device (`str`, *optional*): default `"cuda"` when available, else `"cpu"`.
        attn_implementation (`str`): the target's attention; the engine needs `"sdpa"` or `"eager"`.
    """

    target: str
    draft: str | None = None
    assistant: str | None = None
    dtype: str = "auto"
    device: str | None = None
    attn_implementation: str = "sdpa"


@dataclass
class BenchModels:
    """The loaded models: the target, and the drafts that were asked for."""

    target: PreTrainedModel
    draft: GlideForCausalLM | None
    assistant: PreTrainedModel | None
    device: torch.device


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in MODEL_DTYPES:
        raise GlideConfigError(f"Unknown `dtype={dtype!r}`: expected 'auto' or one of {sorted(MODEL_DTYPES)}.")
    return MODEL_DTYPES[dtype]


def load_models(spec: ModelSpec) -> BenchModels:
    """Load the target on `spec.device` in `spec.dtype`, and the drafts named in `spec` beside it, in eval mode."""
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    target = AutoModelForCausalLM.from_pretrained(
        spec.target, dtype=dtype, device_map=str(device), attn_implementation=spec.attn_implementation
    ).eval()
    draft = None
    if spec.draft is not None:
        draft = GlideForCausalLM.from_pretrained(spec.draft, target_model=target, dtype=dtype).to(device).eval()
    assistant = None
    if spec.assistant is not None:
        assistant = AutoModelForCausalLM.from_pretrained(spec.assistant, dtype=dtype, device_map=str(device)).eval()
    return BenchModels(target=target, draft=draft, assistant=assistant, device=device)


def configure_assisted_decoding(models: BenchModels, num_draft_tokens: int | None) -> int:
    """Give both drafts of the stock path the same settings: `num_draft_tokens` a round (default: the GLIDE draft's,
    else 5), a constant schedule and no confidence cut-off (Transformers' default 0.4 stops an unsure draft early).
    Returns the number of draft tokens."""
    if num_draft_tokens is None:
        num_draft_tokens = models.draft.config.num_draft_tokens if models.draft is not None else 5
    for model in (models.draft, models.assistant):
        if model is not None:
            model.generation_config.num_assistant_tokens = num_draft_tokens
            model.generation_config.num_assistant_tokens_schedule = "constant"
            model.generation_config.assistant_confidence_threshold = 0.0
    return num_draft_tokens


# --- one generation call -------------------------------------------------------------------------------------------


@dataclass
class DecodingSettings:
    """What every method is asked to do.

    Args:
        max_new_tokens (`int`): tokens generated per prompt (fewer when the target ends the sequence).
        temperatures (`tuple[float, ...]`): 0 means greedy; other values sample at that temperature (the target's
            own generation config supplies any other setting, the same for every method).
        num_draft_tokens (`int`, *optional*): draft tokens per round for assisted decoding and the engine's chain
            and CAPE spine; default: the GLIDE draft's `num_draft_tokens`.
        tree_widths (`tuple[int, ...]`, *optional*): the engine's tree; default: the engine's.
        prompt_lookup_tokens (`int`): `prompt_lookup_num_tokens` of prompt lookup decoding.
        seed (`int`): each call seeds torch with `seed + prompt index` (sampling is then reproducible per prompt).
    """

    max_new_tokens: int = 256
    temperatures: tuple[float, ...] = (0.0, 0.7)
    num_draft_tokens: int | None = None
    tree_widths: tuple[int, ...] | None = None
    prompt_lookup_tokens: int = 10
    seed: int = 0


@dataclass
class _Counter:
    count: int = 0


@contextmanager
def count_forward_calls(module: torch.nn.Module) -> Iterator[_Counter]:
    """Count calls of `module.forward` inside the block with a forward pre-hook, removed on exit."""
    counter = _Counter()

    def hook(module, args, kwargs):
        counter.count += 1

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sampling_kwargs(temperature: float) -> dict:
    return {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}


# The other methods: the keyword arguments that make `target.generate` run each of them.
STOCK_METHODS: dict[str, Callable[[BenchModels, DecodingSettings], dict]] = {
    "vanilla": lambda models, settings: {},
    "glide_assisted": lambda models, settings: {"assistant_model": models.draft},
    "independent_assisted": lambda models, settings: {"assistant_model": models.assistant},
    "prompt_lookup": lambda models, settings: {"prompt_lookup_num_tokens": settings.prompt_lookup_tokens},
}


def _engine_generate(models: BenchModels, method: str, input_ids, attention_mask, settings, max_new_tokens, sampling):
    """One call of the GLIDE engine for an engine `method`, with its statistics (`GlideGenerateOutput`)."""
    strategy = ENGINE_STRATEGIES[method]
    return models.draft.generate(
        input_ids,
        attention_mask=attention_mask,
        draft_strategy=strategy,
        num_draft_tokens=settings.num_draft_tokens,
        tree_widths=settings.tree_widths if strategy == "tree" else None,
        num_draft_tokens_schedule="heuristic" if method == "engine_adaptive" else "constant",
        max_new_tokens=max_new_tokens,
        return_dict_in_generate=True,
        **sampling,
    )


def generate_continuation(
    models: BenchModels,
    method: str,
    input_ids: torch.LongTensor,
    temperature: float,
    settings: DecodingSettings,
    max_new_tokens: int | None = None,
) -> tuple[list[int], int]:
    """One call of `method` on a `[1, L]` prompt: the new tokens and the number of target forward passes."""
    max_new_tokens = settings.max_new_tokens if max_new_tokens is None else max_new_tokens
    attention_mask = torch.ones_like(input_ids)
    sampling = sampling_kwargs(temperature)
    if method in ENGINE_STRATEGIES:
        output = _engine_generate(models, method, input_ids, attention_mask, settings, max_new_tokens, sampling)
        count = int(output.new_tokens[0])
        prompt_length = input_ids.shape[1]
        return output.sequences[0, prompt_length : prompt_length + count].tolist(), output.num_target_forwards
    if method not in STOCK_METHODS:
        raise GlideConfigError(f"Unknown method {method!r}; expected one of {METHODS}.")
    extra = STOCK_METHODS[method](models, settings)
    with count_forward_calls(models.target) as counter:
        sequences = models.target.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **sampling, **extra
        )
    # Batch size 1: the call stops at end-of-sequence, so no padding follows the new tokens.
    return sequences[0, input_ids.shape[1] :].tolist(), counter.count


# Methods whose tau pass can run prompts in left-padded batches (`batch_size > 1`): plain decoding and the engine.
# The stock assisted paths cannot (Transformers' assisted decoding takes batch size 1 only).
BATCHABLE_METHODS: tuple[str, ...] = ("vanilla", *ENGINE_STRATEGIES)


def runs_batched(method: str, temperature: float) -> bool:
    """Whether `method` at `temperature` runs in batches when `batch_size > 1`. Vanilla greedy stays at batch 1: it
    is the reference of the exactness check, and a padded batch can break a floating-point tie differently."""
    return method in BATCHABLE_METHODS and not (method == "vanilla" and temperature == 0)


def _eos_token_ids(model: PreTrainedModel) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def generate_batch_continuations(
    models: BenchModels,
    method: str,
    prompts: Sequence[Sequence[int]],
    temperature: float,
    settings: DecodingSettings,
) -> list[tuple[list[int], int]]:
    """One call of `method` (one of `BATCHABLE_METHODS`) on several prompts, left-padded into one batch: per prompt,
    the new tokens and the target forward passes that a batch-1 call would have counted.

    - engine: row b took part in the prefill and in the rounds where `accepted_per_round[:, b] >= 0` (-1 once it had
      finished), so its count is those rounds + 1; its tokens are its first `new_tokens[b]` after the prompt width.
    - vanilla: plain decoding runs one target forward per new token, so a row's count is its new tokens; a row
      ends at its first end-of-sequence token (kept, as a batch-1 call keeps it), padding follows.
    """
    if method not in BATCHABLE_METHODS:
        raise GlideConfigError(f"Method {method!r} cannot run batched; those that can: {sorted(BATCHABLE_METHODS)}.")
    width = max(len(prompt) for prompt in prompts)
    # The padding id is masked out (the engine moves padding behind each prompt, `generate` masks it): any id works.
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long, device=models.device)  # [B, L]
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    sampling = sampling_kwargs(temperature)
    if method in ENGINE_STRATEGIES:
        output = _engine_generate(
            models, method, input_ids, attention_mask, settings, settings.max_new_tokens, sampling
        )
        rounds = (output.accepted_per_round >= 0).sum(0).tolist()  # [B]
        counts = output.new_tokens.tolist()
        sequences = output.sequences.tolist()
        return [(sequences[row][width : width + count], rounds[row] + 1) for row, count in enumerate(counts)]
    sequences = models.target.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=settings.max_new_tokens, **sampling
    )[:, width:].tolist()
    eos = _eos_token_ids(models.target)
    results = []
    for tokens in sequences:
        end = next((i + 1 for i, token in enumerate(tokens) if token in eos), len(tokens))
        results.append((tokens[:end], end))
    return results


@dataclass
class Job:
    """One generation call of the evaluation."""

    method: str
    temperature: float
    prompt_index: int
    prompt: list[int]


@dataclass
class JobRecord:
    """What one call produced: the new tokens, the target forward passes, and its wall-clock seconds."""

    method: str
    temperature: float
    prompt_index: int
    tokens: list[int]
    target_forwards: int
    seconds: float

    @property
    def key(self) -> tuple[str, float]:
        return self.method, self.temperature


@dataclass
class BatchJob:
    """One batched call of the tau pass: the prompts `prompt_indices` of one method and temperature."""

    method: str
    temperature: float
    prompt_indices: list[int]
    prompts: list[list[int]]

    @property
    def prompt_index(self) -> int:
        """The first prompt's index: it seeds the call and names it in errors."""
        return self.prompt_indices[0]


def run_batch_job(models: BenchModels, job: BatchJob, settings: DecodingSettings) -> list[JobRecord]:
    """Run one batched call, seeded with `settings.seed + job.prompt_index` (at a temperature above 0 each row is
    an independent sample, not the one a batch-1 call would draw); one record per prompt, each with an equal share
    of the call's seconds (speed is measured at batch 1, by the timing pass)."""
    synchronize(models.device)
    torch.manual_seed(settings.seed + job.prompt_index)
    start = time.perf_counter()
    with torch.no_grad():
        rows = generate_batch_continuations(models, job.method, job.prompts, job.temperature, settings)
    synchronize(models.device)
    share = (time.perf_counter() - start) / len(rows)
    return [
        JobRecord(job.method, job.temperature, index, tokens, forwards, share)
        for index, (tokens, forwards) in zip(job.prompt_indices, rows)
    ]


def run_any_job(models: BenchModels, job: Job | BatchJob, settings: DecodingSettings) -> list[JobRecord]:
    """`run_batch_job` for a `BatchJob`, `run_job` for a `Job`: the records of the call."""
    if isinstance(job, BatchJob):
        return run_batch_job(models, job, settings)
    return [run_job(models, job, settings)]


def build_jobs(
    prompts: Sequence[Sequence[int]], keys: Sequence[tuple[str, float]], batch_size: int = 1
) -> list[Job | BatchJob]:
    """The calls of the tau pass, in prompt order: per group of `batch_size` prompts, one `BatchJob` per key that
    `runs_batched`, then prompt by prompt one `Job` per other key. With `batch_size=1`, one `Job` per call."""
    jobs: list[Job | BatchJob] = []
    for start in range(0, len(prompts), batch_size):
        group = range(start, min(start + batch_size, len(prompts)))
        batched = [key for key in keys if batch_size > 1 and runs_batched(*key)]
        single = [key for key in keys if key not in batched]
        jobs.extend(
            BatchJob(method, temperature, list(group), [list(prompts[i]) for i in group])
            for method, temperature in batched
        )
        jobs.extend(Job(method, temperature, i, list(prompts[i])) for i in group for method, temperature in single)
    return jobs


def run_job(models: BenchModels, job: Job, settings: DecodingSettings, max_new_tokens: int | None = None) -> JobRecord:
    """Run one call, seeded with `settings.seed + job.prompt_index`, timed with the device synchronised."""
    input_ids = torch.tensor([job.prompt], dtype=torch.long, device=models.device)
    torch.manual_seed(settings.seed + job.prompt_index)
    synchronize(models.device)
    start = time.perf_counter()
    with torch.no_grad():
        tokens, forwards = generate_continuation(
            models, job.method, input_ids, job.temperature, settings, max_new_tokens
        )
    synchronize(models.device)
    return JobRecord(job.method, job.temperature, job.prompt_index, tokens, forwards, time.perf_counter() - start)


def is_looping(tokens: Sequence[int], min_tokens: int = MIN_LOOP_CHECK_TOKENS) -> bool:
    """Whether a continuation ends in a loop: its last half is one block of tokens repeated, at least twice (a line
    of code written again and again).

    Worked example: `a b c d x y x y x y x y` (12 tokens, `min_tokens=8`): the last half `x y x y x y` repeats
    `x y`, so it loops; `a b c d e f g h` does not. Continuations shorter than `min_tokens` never loop.
    """
    if len(tokens) < min_tokens:
        return False
    tail = list(tokens[len(tokens) - len(tokens) // 2 :])
    # Period p: tail[i] == tail[i + p] for every i. With p <= len(tail) // 2 the block occurs at least twice.
    return any(
        all(tail[i] == tail[i + period] for i in range(len(tail) - period)) for period in range(1, len(tail) // 2 + 1)
    )


# --- the evaluation ------------------------------------------------------------------------------------------------


@dataclass
class MethodSummary:
    """One row of the result table: a method at one temperature, over the prompts that every method finished.

    `greedy_identical` counts the prompts whose greedy continuation equals vanilla's (None when not compared);
    speed comes from the `timed_prompts` calls, measured alone (`timed_tau`: their tau, to tell whether they are
    typical).
    """

    method: str
    temperature: float
    num_prompts: int = 0
    new_tokens: int = 0
    target_forwards: int = 0
    tau: float | None = None
    looping_share: float | None = None
    greedy_identical: int | None = None
    timed_prompts: int = 0
    timed_tokens: int = 0
    timed_seconds: float = 0.0
    timed_tau: float | None = None
    tokens_per_second: float | None = None
    speedup: float | None = None
    error: str | None = None


@dataclass
class BenchResult:
    """Everything `evaluate` measured. `records` hold the calls of the complete prompts (all methods finished)."""

    summaries: list[MethodSummary]
    records: list[JobRecord]
    timed_records: list[JobRecord]
    mismatches: list[dict]
    errors: list[dict]
    prompt_indices: list[int]
    num_prompts_requested: int
    workers: int
    settings: DecodingSettings
    num_draft_tokens: int | None
    seconds: dict = field(default_factory=dict)
    batch_size: int = 1

    def summary(self, method: str, temperature: float) -> MethodSummary | None:
        return next((s for s in self.summaries if s.method == method and s.temperature == temperature), None)

    def to_dict(self) -> dict:
        """JSON-ready data; per call, token counts instead of the tokens."""
        return {
            "summaries": [dataclasses.asdict(summary) for summary in self.summaries],
            "calls": [
                {
                    "method": record.method,
                    "temperature": record.temperature,
                    "prompt_index": record.prompt_index,
                    "new_tokens": len(record.tokens),
                    "target_forwards": record.target_forwards,
                    "looping": is_looping(record.tokens),
                }
                for record in self.records
            ],
            "timed_calls": [
                {
                    "method": record.method,
                    "temperature": record.temperature,
                    "prompt_index": record.prompt_index,
                    "new_tokens": len(record.tokens),
                    "seconds": record.seconds,
                }
                for record in self.timed_records
            ],
            "mismatches": self.mismatches,
            "errors": self.errors,
            "num_prompts": len(self.prompt_indices),
            "num_prompts_requested": self.num_prompts_requested,
            "workers": self.workers,
            "settings": dataclasses.asdict(self.settings),
            "num_draft_tokens": self.num_draft_tokens,
            "seconds": self.seconds,
            "batch_size": self.batch_size,
        }


def check_methods(methods: Sequence[str], spec: ModelSpec) -> None:
    """Raise `GlideConfigError` for an unknown method, or one whose model `spec` does not name."""
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise GlideConfigError(f"Unknown method(s) {unknown}; expected some of {list(METHODS)}.")
    if spec.draft is None and DRAFT_METHODS.intersection(methods):
        raise GlideConfigError(
            f"Methods {sorted(DRAFT_METHODS.intersection(methods))} need a GLIDE draft (`ModelSpec.draft`)."
        )
    if spec.assistant is None and ASSISTANT_METHODS.intersection(methods):
        raise GlideConfigError(
            "Method `independent_assisted` needs an independent draft model (`ModelSpec.assistant`)."
        )


def evaluate(
    spec: ModelSpec,
    prompts: Sequence[Sequence[int]],
    methods: Sequence[str],
    settings: DecodingSettings,
    workers: int = 0,
    timing_prompts: int | None = None,
    deadline: float | None = None,
    timing_seconds: float = 60.0,
    batch_size: int = 1,
) -> BenchResult:
    """Run every method on every prompt at every temperature; see the module docstring for what is measured.

    Args:
        spec (`ModelSpec`): the models (loaded here, and in each worker).
        prompts (`Sequence[Sequence[int]]`): token ids, one prompt each.
        methods (`Sequence[str]`): names from `METHODS`.
        settings (`DecodingSettings`): new tokens, temperatures, draft settings, seed.
        workers (`int`): 0 runs every call here, each one timed. More spreads the calls over that many processes
            sharing the device, then times `timing_prompts` prompts per method here, alone.
        timing_prompts (`int`, *optional*): prompts timed per method and temperature when `workers > 0`
            (default 5).
        deadline (`float`, *optional*): a `time.monotonic()` value after which no new prompt is started; the
            parallel pass ends `timing_seconds` before it, to leave time for the timing pass.
        timing_seconds (`float`): time kept for the timing pass (`workers > 0` or `batch_size > 1`) when `deadline`
            is set.
        batch_size (`int`): above 1, the tau pass runs the methods that `runs_batched` in left-padded batches of up
            to this many prompts, and speed comes from the timing pass at batch 1 (as with `workers > 0`).

    Returns:
        `BenchResult`.
    """
    check_methods(methods, spec)
    if not prompts:
        raise EmptyDatasetError("No prompts to evaluate.")
    if batch_size < 1:
        raise GlideConfigError(f"`batch_size` must be at least 1, got {batch_size}.")
    temperatures = tuple(settings.temperatures)
    keys = [(method, temperature) for temperature in temperatures for method in methods]
    jobs = build_jobs(prompts, keys, batch_size)
    errors: list[dict] = []
    seconds: dict = {}
    start = time.monotonic()
    pass_deadline = None if deadline is None else deadline - timing_seconds
    batched = any(isinstance(job, BatchJob) for job in jobs)
    if workers > 0:
        records = _run_parallel(spec, settings, jobs, workers, pass_deadline, errors)
        seconds["parallel_pass"] = time.monotonic() - start
    models = load_models(spec)
    num_draft_tokens = configure_assisted_decoding(models, settings.num_draft_tokens)
    if workers == 0:
        records = _run_sequential(
            models, settings, prompts, jobs, keys, pass_deadline if batched else deadline, errors
        )
        seconds["sequential_pass"] = time.monotonic() - start
    timed = None  # every call of the complete prompts (below), unless a timing pass follows
    if workers > 0 or batched:
        timing_start = time.monotonic()
        failed = {(error["method"], error["temperature"]) for error in errors}
        live_keys = [key for key in keys if key not in failed]
        timed = _run_timing_pass(models, settings, prompts, live_keys, timing_prompts or 5, deadline, errors)
        seconds["timing_pass"] = time.monotonic() - timing_start

    failed = {(error["method"], error["temperature"]) for error in errors}
    live_keys = [key for key in keys if key not in failed]
    finished: dict[int, set] = {}
    for record in records:
        finished.setdefault(record.prompt_index, set()).add(record.key)
    complete = sorted(index for index, done in finished.items() if done.issuperset(live_keys))
    if len(complete) < len(prompts):
        logger.warning(
            f"Only {len(complete)} of {len(prompts)} prompts were finished by every method before the deadline; "
            "the results cover those."
        )
    complete_set = set(complete)
    records = [record for record in records if record.prompt_index in complete_set]
    if timed is None:
        timed = records
    mismatches = _greedy_mismatches(records)
    _diagnose_mismatches(models, prompts, records, mismatches)
    summaries = summarize(records, timed, keys, errors)
    seconds["total"] = time.monotonic() - start
    return BenchResult(
        summaries=summaries,
        records=records,
        timed_records=timed,
        mismatches=mismatches,
        errors=errors,
        prompt_indices=complete,
        num_prompts_requested=len(prompts),
        workers=workers,
        settings=settings,
        num_draft_tokens=num_draft_tokens,
        seconds=seconds,
        batch_size=batch_size,
    )


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _error_entry(job: Job | BatchJob, error: BaseException) -> dict:
    return {
        "method": job.method,
        "temperature": job.temperature,
        "prompt_index": job.prompt_index,
        "error": f"{type(error).__name__}: {error}",
    }


def _warm_up(models: BenchModels, settings: DecodingSettings, prompt: Sequence[int], key, errors: list) -> bool:
    """One short untimed call of a method; False (and the error recorded) when it fails."""
    method, temperature = key
    job = Job(method, temperature, 0, list(prompt))
    try:
        run_job(models, job, settings, max_new_tokens=min(WARMUP_NEW_TOKENS, settings.max_new_tokens))
    except Exception as error:  # one broken method must not stop the others: recorded, logged, reported
        logger.exception(f"`{method}` at temperature {temperature} failed its warm-up call.")
        errors.append(_error_entry(job, error))
        return False
    return True


def _run_sequential(models, settings, prompts, jobs, keys, deadline, errors) -> list[JobRecord]:
    """Every call in this process, in the order of `jobs` (prompt by prompt, all methods of a prompt together),
    each one timed."""
    live = {key for key in keys if _warm_up(models, settings, prompts[0], key, errors)}
    records: list[JobRecord] = []
    progress = logging.tqdm(total=len(jobs), desc="bench", unit="call")
    current_prompt = None
    for job in jobs:
        if job.prompt_index != current_prompt:
            if _past(deadline):
                logger.warning(f"Deadline reached: stopping before prompt {job.prompt_index}.")
                break
            current_prompt = job.prompt_index
        progress.update(1)
        if (job.method, job.temperature) not in live:
            continue
        try:
            records.extend(run_any_job(models, job, settings))
        except Exception as error:  # one broken method must not stop the others: recorded, logged, reported
            logger.exception(f"`{job.method}` failed on prompt {job.prompt_index}.")
            errors.append(_error_entry(job, error))
            live.discard((job.method, job.temperature))
    progress.close()
    return records


# Worker processes: the pool's initializer loads the models once per process into this dict, which the tasks read
# (a process pool's tasks are plain functions; this state exists in worker processes only).
_WORKER_STATE: dict = {}


def _init_worker(spec: ModelSpec, settings: DecodingSettings) -> None:
    # The calls are single-token GPU work: intra-op CPU threads only compete with the other workers.
    torch.set_num_threads(1)
    models = load_models(spec)
    configure_assisted_decoding(models, settings.num_draft_tokens)
    _WORKER_STATE.update(models=models, settings=settings)


def _run_job_in_worker(job: Job | BatchJob) -> list[JobRecord]:
    return run_any_job(_WORKER_STATE["models"], job, _WORKER_STATE["settings"])


def _run_parallel(spec, settings, jobs, workers, deadline, errors) -> list[JobRecord]:
    """Spread the calls over `workers` processes (spawned: CUDA cannot be forked), in prompt order, until
    `deadline`."""
    records: list[JobRecord] = []
    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(spec, settings))
    progress = logging.tqdm(total=len(jobs), desc="bench (parallel)", unit="call")
    failed: set = set()
    try:
        futures = {executor.submit(_run_job_in_worker, job): job for job in jobs}
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            for future in as_completed(futures, timeout=timeout):
                job = futures[future]
                progress.update(1)
                if future.cancelled():
                    continue
                try:
                    records.extend(future.result())
                except BrokenProcessPool as error:
                    logger.error(f"A worker process died ({error}); stopping the parallel pass.")
                    errors.append(
                        {
                            "method": "worker pool",
                            "temperature": None,
                            "prompt_index": job.prompt_index,
                            "error": f"{type(error).__name__}: {error}",
                        }
                    )
                    break
                except Exception as error:  # one broken method must not stop the others: recorded and reported
                    logger.error(f"`{job.method}` failed on prompt {job.prompt_index}: {error}")
                    errors.append(_error_entry(job, error))
                    key = (job.method, job.temperature)
                    if key not in failed:
                        failed.add(key)
                        for other, other_job in futures.items():
                            if (other_job.method, other_job.temperature) == key:
                                other.cancel()
        except TimeoutError:
            logger.warning("Deadline reached: cancelling the calls not started yet.")
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        progress.close()
    return records


def _run_timing_pass(models, settings, prompts, keys, timing_prompts, deadline, errors) -> list[JobRecord]:
    """Time every method alone on the same first prompts: one warm-up call each, then prompt by prompt (all methods
    of a prompt together) up to `timing_prompts` prompts, the first always, the others while `deadline` allows. A
    prompt the deadline cuts short is dropped for every method, so that all rows are timed on the same prompts."""
    live = [key for key in keys if _warm_up(models, settings, prompts[0], key, errors)]
    timed: list[JobRecord] = []
    for index in range(min(timing_prompts, len(prompts))):
        round_records = []
        for method, temperature in list(live):
            if index > 0 and _past(deadline):
                return timed
            job = Job(method, temperature, index, list(prompts[index]))
            try:
                round_records.append(run_job(models, job, settings))
            except Exception as error:  # one broken method must not stop the others: recorded, logged, reported
                logger.exception(f"`{method}` failed on prompt {index} of the timing pass.")
                errors.append(_error_entry(job, error))
                live.remove((method, temperature))
                timed = [record for record in timed if record.key != (method, temperature)]
        timed.extend(record for record in round_records if record.key in live)
    return timed


def _greedy_mismatches(records: list[JobRecord]) -> list[dict]:
    """Greedy continuations that differ from vanilla's: method, prompt, first differing token."""
    vanilla = {r.prompt_index: r.tokens for r in records if r.method == "vanilla" and r.temperature == 0}
    mismatches = []
    for record in records:
        if record.temperature != 0 or record.method == "vanilla" or record.prompt_index not in vanilla:
            continue
        expected = vanilla[record.prompt_index]
        if record.tokens == expected:
            continue
        position = next(
            (i for i, (a, b) in enumerate(zip(expected, record.tokens)) if a != b),
            min(len(expected), len(record.tokens)),
        )
        mismatches.append(
            {
                "method": record.method,
                "prompt_index": record.prompt_index,
                "position": position,
                "vanilla_token": expected[position] if position < len(expected) else None,
                "method_token": record.tokens[position] if position < len(record.tokens) else None,
            }
        )
    return mismatches


@torch.no_grad()
def _diagnose_mismatches(models: BenchModels, prompts, records: list[JobRecord], mismatches: list[dict]) -> None:
    """Add to each mismatch the gap between the target's two best logits where the outputs part, after vanilla's
    tokens: a gap near zero is a floating-point tie (one-token and several-token forwards run different kernels),
    a large one a bug."""
    vanilla = {r.prompt_index: r.tokens for r in records if r.method == "vanilla" and r.temperature == 0}
    for mismatch in mismatches[:MAX_DIAGNOSED_MISMATCHES]:
        index = mismatch["prompt_index"]
        prefix = list(prompts[index]) + vanilla[index][: mismatch["position"]]
        logits = models.target(input_ids=torch.tensor([prefix], device=models.device)).logits[0, -1].float()
        top = logits.topk(2).values
        mismatch["top2_logit_gap"] = float(top[0] - top[1])


def summarize(
    records: list[JobRecord], timed: list[JobRecord], keys: Sequence[tuple[str, float]], errors: list[dict]
) -> list[MethodSummary]:
    """One `MethodSummary` per (method, temperature) of `keys`, in that order."""
    vanilla = {r.prompt_index: r.tokens for r in records if r.method == "vanilla" and r.temperature == 0}
    summaries = []
    for method, temperature in keys:
        summary = MethodSummary(method, temperature)
        own = [r for r in records if r.key == (method, temperature)]
        if own:
            summary.num_prompts = len(own)
            summary.new_tokens = sum(len(r.tokens) for r in own)
            summary.target_forwards = sum(r.target_forwards for r in own)
            summary.tau = summary.new_tokens / max(summary.target_forwards, 1)
            summary.looping_share = sum(is_looping(r.tokens) for r in own) / len(own)
            if temperature == 0 and method != "vanilla" and vanilla:
                summary.greedy_identical = sum(r.tokens == vanilla.get(r.prompt_index) for r in own)
        own_timed = [r for r in timed if r.key == (method, temperature)]
        if own_timed:
            summary.timed_prompts = len(own_timed)
            summary.timed_tokens = sum(len(r.tokens) for r in own_timed)
            summary.timed_seconds = sum(r.seconds for r in own_timed)
            summary.timed_tau = summary.timed_tokens / max(sum(r.target_forwards for r in own_timed), 1)
            summary.tokens_per_second = summary.timed_tokens / max(summary.timed_seconds, 1e-9)
        failure = next((e for e in errors if (e["method"], e["temperature"]) == (method, temperature)), None)
        if failure is not None:
            summary.error = failure["error"]
        summaries.append(summary)
    for summary in summaries:
        base = next((s for s in summaries if s.method == "vanilla" and s.temperature == summary.temperature), None)
        if base is not None and base.tokens_per_second and summary.tokens_per_second:
            summary.speedup = summary.tokens_per_second / base.tokens_per_second
    return summaries


# --- output --------------------------------------------------------------------------------------------------------


def decoding_name(temperature: float | None) -> str:
    if temperature is None:
        return "every decoding"
    return "greedy" if temperature == 0 else f"T={temperature:g}"


def format_table(summaries: Sequence[MethodSummary]) -> str:
    """The result table in Markdown: tau, tokens/s, speedup over vanilla, greedy exactness, looping share."""
    lines = [
        "| method | decoding | prompts | tau | tokens/s | speedup | greedy = vanilla | looping |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        label = METHOD_LABELS.get(s.method, s.method)
        if s.error is not None:
            lines.append(f"| {label} | {decoding_name(s.temperature)} | failed: {s.error[:80]} | | | | | |")
            continue
        tau = f"{s.tau:.2f}" if s.tau is not None else "-"
        speed = f"{s.tokens_per_second:.1f}" if s.tokens_per_second is not None else "-"
        speedup = f"{s.speedup:.2f}x" if s.speedup is not None else "-"
        exact = f"{s.greedy_identical}/{s.num_prompts}" if s.greedy_identical is not None else "-"
        looping = f"{s.looping_share:.0%}" if s.looping_share is not None else "-"
        lines.append(
            f"| {label} | {decoding_name(s.temperature)} | {s.num_prompts} | {tau} | {speed} | {speedup} | {exact} "
            f"| {looping} |"
        )
    return "\n".join(lines)


def format_notes(result: BenchResult) -> str:
    """What the table's numbers are over, and any mismatch or failure, as Markdown lines."""
    settings = result.settings
    timed = sorted({s.timed_prompts for s in result.summaries if s.timed_prompts})
    lines = [
        f"- {len(result.prompt_indices)} prompts (of {result.num_prompts_requested}), up to "
        f"{settings.max_new_tokens} new tokens each; {result.num_draft_tokens} draft tokens a round (assisted, "
        f"engine chain and CAPE spine), tree widths {settings.tree_widths or 'engine default'}, prompt lookup "
        f"{settings.prompt_lookup_tokens} tokens.",
        "- tau: new tokens per target forward pass (prefill included). looping: continuations whose last half "
        "repeats one block of tokens.",
    ]
    batched = [s for s in result.summaries if result.batch_size > 1 and runs_batched(s.method, s.temperature)]
    if batched:
        names = ", ".join(f"`{s.method}` {decoding_name(s.temperature)}" for s in batched)
        lines.append(
            f"- tau, exactness and looping of {names} from left-padded batches of up to {result.batch_size} prompts; "
            "every other row one prompt per call (vanilla greedy, the exactness reference, included)."
        )
    if result.workers > 0 or batched:
        where = f"{result.workers} worker process(es) sharing the device" if result.workers > 0 else "one process"
        lines.append(
            f"- tau, exactness and looping from {where}; tokens/s from "
            f"{'/'.join(map(str, timed)) or 'no'} prompt(s) per row timed afterwards at batch size 1 in one process "
            "alone."
        )
    else:
        lines.append("- tokens/s: every call timed, one process, after one warm-up call per row.")
    for mismatch in result.mismatches:
        gap = mismatch.get("top2_logit_gap")
        gap_text = f", target top-2 logit gap {gap:.2e} there" if gap is not None else ""
        lines.append(
            f"- greedy MISMATCH: `{mismatch['method']}` prompt {mismatch['prompt_index']} differs from vanilla at new "
            f"token {mismatch['position']}{gap_text}"
        )
    for error in result.errors:
        lines.append(
            f"- FAILED: `{error['method']}` at {decoding_name(error['temperature'])}, prompt "
            f"{error['prompt_index']}: {error['error']}"
        )
    return "\n".join(lines)


def plot_summaries(summaries: Sequence[MethodSummary], path: str, title: str = "") -> bool:
    """Bar charts of tau and of speedup per method and temperature, written to `path` (PNG). Returns False, with a
    warning, when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("matplotlib is not installed: no plot written.")
        return False
    # The object-oriented API with the Agg canvas: no pyplot, so no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(s.method for s in summaries))
    temperatures = list(dict.fromkeys(s.temperature for s in summaries))
    figure = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(figure)
    width = 0.8 / max(len(temperatures), 1)
    for axis, attribute, label in zip(
        figure.subplots(1, 2), ("tau", "speedup"), ("tokens per target forward (tau)", "speedup over vanilla")
    ):
        for offset, temperature in enumerate(temperatures):
            values = []
            for method in methods:
                summary = next((s for s in summaries if s.method == method and s.temperature == temperature), None)
                value = getattr(summary, attribute) if summary is not None else None
                values.append(value or 0.0)
            positions = [i + (offset - (len(temperatures) - 1) / 2) * width for i in range(len(methods))]
            axis.bar(positions, values, width, label=decoding_name(temperature))
        axis.axhline(1.0, color="gray", linewidth=0.8)
        axis.set_xticks(range(len(methods)))
        axis.set_xticklabels([METHOD_LABELS.get(m, m).replace("`", "") for m in methods], rotation=30, ha="right")
        axis.set_ylabel(label)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


# --- prompts -------------------------------------------------------------------------------------------------------


def load_prompts(
    path: str,
    tokenizer=None,
    num_prompts: int | None = None,
    max_prompt_tokens: int | None = None,
    tokenizer_loader: Callable[[], object] | None = None,
) -> list[list[int]]:
    """Token ids of the prompts in `path`.

    A `.jsonl` file holds one object per line with `input_ids` (token ids, used as they are), `prompt` or `text`
    (tokenized), or `messages` (rendered with the tokenizer's chat template and a generation prompt; a final
    assistant turn is dropped, so that a training conversation asks for that reply). Any other file holds one
    prompt per line (empty lines skipped).

    Args:
        path (`str`): the prompts file.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): needed unless every prompt is given as `input_ids`.
        tokenizer_loader (`Callable`, *optional*): instead of `tokenizer`, a function that loads it, called at the
            first prompt that needs one (a file of token ids then needs no tokenizer at all).
        num_prompts (`int`, *optional*): keep the first n prompts.
        max_prompt_tokens (`int`, *optional*): keep the last n tokens of each prompt.

    Raises:
        `DataNotFoundError` when `path` does not exist, `DataFormatError` (naming the line) for a malformed
        record, `EmptyDatasetError` when no prompt is found.
    """
    if not os.path.isfile(path):
        raise DataNotFoundError(f"Prompts file `{path}` does not exist.")
    source = _TokenizerSource(tokenizer, tokenizer_loader)
    prompts: list[list[int]] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if num_prompts is not None and len(prompts) >= num_prompts:
                break
            if not line.strip():
                continue
            location = f"{path}:{line_number}"
            if path.endswith(".jsonl"):
                ids = _record_prompt(line, location, source)
            else:
                ids = _encode(source, line.rstrip("\n"), location, add_special_tokens=True)
            if not ids:
                raise DataFormatError(f"{location}: the prompt is empty after tokenization.")
            prompts.append(ids[-max_prompt_tokens:] if max_prompt_tokens else ids)
    if not prompts:
        raise EmptyDatasetError(f"No prompt found in `{path}`.")
    return prompts


@dataclass
class _TokenizerSource:
    """A tokenizer given, or loaded by `loader` when a prompt first needs one."""

    tokenizer: object = None
    loader: Callable[[], object] | None = None

    def get(self):
        if self.tokenizer is None and self.loader is not None:
            self.tokenizer = self.loader()
        return self.tokenizer


def _record_prompt(line: str, location: str, source: _TokenizerSource) -> list[int]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{location}: not valid JSON ({error.msg}).") from error
    if not isinstance(record, dict):
        raise DataFormatError(f"{location}: expected a JSON object, got {type(record).__name__}.")
    if "input_ids" in record:
        ids = record["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(token, int) for token in ids):
            raise DataFormatError(f"{location}: `input_ids` must be a list of integers.")
        return ids
    for name in ("prompt", "text"):
        if name in record:
            if not isinstance(record[name], str):
                raise DataFormatError(f"{location}: `{name}` must be a string.")
            return _encode(source, record[name], location, add_special_tokens=True)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DataFormatError(f"{location}: `messages` must be a list of {{role, content}} objects.")
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        tokenizer = source.get()
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataFormatError(
                f"{location}: a `messages` prompt needs a tokenizer with a chat template (`--tokenizer`)."
            )
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return _encode(source, text, location, add_special_tokens=False)
    raise DataFormatError(f"{location}: expected one of the fields `input_ids`, `prompt`, `text`, `messages`.")


def _encode(source: _TokenizerSource, text: str, location: str, add_special_tokens: bool) -> list[int]:
    tokenizer = source.get()
    if tokenizer is None:
        raise DataFormatError(f"{location}: a text prompt needs a tokenizer (`--tokenizer`, or the target's).")
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


# --- command line --------------------------------------------------------------------------------------------------


@dataclass
class BenchArguments:
    """Flags of `glide-hf bench`."""

    prompts: str = field(
        metadata={
            "help": "Prompts: JSONL with `input_ids`, `prompt`, `text` or `messages` per line, or a text file with "
            "one prompt per line."
        }
    )
    draft: str | None = field(default=None, metadata={"help": "GLIDE draft folder or Hub id."})
    target: str | None = field(
        default=None, metadata={"help": "Target folder or Hub id. Default: the draft's `target_name_or_path`."}
    )
    assistant: str | None = field(
        default=None, metadata={"help": "An ordinary small causal LM (same vocabulary) for `independent_assisted`."}
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer for text prompts. Default: the target's."}
    )
    methods: list[str] | None = field(
        default=None,
        metadata={"help": f"Methods to run (some of {', '.join(METHODS)}). Default: all that the models allow."},
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Tokens generated per prompt."})
    num_prompts: int | None = field(default=50, metadata={"help": "Use the first n prompts of the file."})
    max_prompt_tokens: int | None = field(default=None, metadata={"help": "Keep the last n tokens of each prompt."})
    temperature: list[float] = field(
        default_factory=lambda: [0.0, 0.7],
        metadata={"help": "Temperatures to run, 0 meaning greedy (default: greedy and 0.7)."},
    )
    num_draft_tokens: int | None = field(
        default=None, metadata={"help": "Draft tokens per round (assisted, engine chain/CAPE). Default: the draft's."}
    )
    tree_widths: list[int] | None = field(default=None, metadata={"help": "Engine tree widths per level."})
    prompt_lookup_tokens: int = field(default=10, metadata={"help": "`prompt_lookup_num_tokens` of prompt lookup."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Dtype of every model. `auto`: bfloat16 on CUDA, float32 elsewhere."}
    )
    device: str | None = field(default=None, metadata={"help": "Device. Default: cuda when available."})
    workers: int = field(
        default=0,
        metadata={
            "help": "Worker processes sharing the device for tau and exactness (each loads the models); speed is "
            "then timed alone on `timing_prompts` prompts. 0: everything in this process."
        },
    )
    timing_prompts: int = field(
        default=5, metadata={"help": "With `workers` or `batch_size` > 1: prompts timed per method, at batch 1."}
    )
    batch_size: int = field(
        default=1,
        metadata={
            "help": "Above 1: vanilla (sampled) and the engine run the tau pass in left-padded batches of this many "
            "prompts, and speed is timed afterwards at batch 1 on `timing_prompts` prompts."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of sampling (per prompt: seed + prompt index)."})
    output_json: str | None = field(default=None, metadata={"help": "Write the results to this JSON file."})
    plot: str | None = field(default=None, metadata={"help": "Write bar charts of tau and speedup to this PNG."})


def parse_bench_args(argv: list[str], prog: str = "glide-hf bench") -> BenchArguments:
    """Parse and check `glide-hf bench` flags; contradictions exit through `parser.error` (status 2)."""
    parser = HfArgumentParser(
        BenchArguments, prog=prog, description="Measure tau, speed and exactness of speculative decoding methods."
    )
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    if args.methods is not None:
        args.methods = [name for value in args.methods for name in value.split(",") if name]
        unknown = sorted(set(args.methods) - set(METHODS))
        if unknown:
            parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        if not args.methods:
            parser.error(f"--methods names no method; choose from {', '.join(METHODS)}")
    else:
        args.methods = [
            method
            for method in METHODS
            if (method not in DRAFT_METHODS or args.draft) and (method not in ASSISTANT_METHODS or args.assistant)
        ]
    if not args.draft and DRAFT_METHODS.intersection(args.methods):
        parser.error(f"--draft is needed for {', '.join(sorted(DRAFT_METHODS.intersection(args.methods)))}")
    if not args.assistant and ASSISTANT_METHODS.intersection(args.methods):
        parser.error("--assistant (an independent draft model) is needed for independent_assisted")
    for flag, path in (("--draft", args.draft), ("--assistant", args.assistant), ("--target", args.target)):
        if path is not None:  # before any model loads: a wrong path fails here, not minutes later
            model_type = _model_type_at(path, flag, parser)
            if flag == "--draft" and model_type != GlideConfig.model_type:
                parser.error(f"--draft {path} holds a `model_type={model_type!r}` config, not a GLIDE draft")
    if args.target is None:
        if args.draft is None:
            parser.error("give --target (or a --draft whose config names its target)")
        args.target = GlideConfig.from_pretrained(args.draft).target_name_or_path
        if not args.target:
            parser.error(f"the draft at {args.draft} names no target: give --target")
        _model_type_at(args.target, f"--draft {args.draft} names the target", parser)
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        parser.error("--max-prompt-tokens must be at least 1 (leave it out to keep whole prompts)")
    try:
        device = resolve_device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    for flag, path in (("--output-json", args.output_json), ("--plot", args.plot)):
        if path is not None and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(path) or ".")):
            parser.error(f"{flag} {path}: give a file path in an existing folder (written after the run)")
    if any(t < 0 for t in args.temperature) or not args.temperature:
        parser.error("--temperature takes one or more values >= 0 (0 is greedy)")
    if args.num_prompts is not None and args.num_prompts < 1:
        parser.error("--num-prompts must be at least 1")
    if args.max_new_tokens < 1 or args.workers < 0 or args.timing_prompts < 1 or args.batch_size < 1:
        parser.error("--max-new-tokens, --timing-prompts and --batch-size must be >= 1, --workers >= 0")
    return args


def _model_type_at(path: str, flag: str, parser: HfArgumentParser) -> str | None:
    """The `model_type` of the config at a local path or Hub id; a clean parser error when there is none."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            parser.error(f"{flag} {path}: this folder has no config.json (`save_pretrained` writes one)")
    elif path.startswith((os.sep, ".", "~")) or os.path.exists(path):
        parser.error(f"{flag} {path}: no such folder")
    try:
        config, _ = transformers.PreTrainedConfig.get_config_dict(path)
    except OSError as error:
        parser.error(f"{flag} {path}: no model config found ({str(error).splitlines()[0]})")
    if not config:
        parser.error(f"{flag} {path}: no model config found")
    return config.get("model_type")


def run_cli(argv: list[str], prog: str) -> int:
    """`glide-hf bench`: load the prompts and models, evaluate every method, print the table (and write the JSON
    and plot when asked). Returns 1 when a method failed; greedy mismatches are reported in the notes (in bfloat16
    they are mostly ties: see their logit gaps)."""
    args = parse_bench_args(argv, prog)
    prompts = load_prompts(
        args.prompts,
        num_prompts=args.num_prompts,
        max_prompt_tokens=args.max_prompt_tokens,
        tokenizer_loader=lambda: AutoTokenizer.from_pretrained(args.tokenizer or args.target),
    )
    spec = ModelSpec(
        target=args.target, draft=args.draft, assistant=args.assistant, dtype=args.dtype, device=args.device
    )
    settings = DecodingSettings(
        max_new_tokens=args.max_new_tokens,
        temperatures=tuple(args.temperature),
        num_draft_tokens=args.num_draft_tokens,
        tree_widths=tuple(args.tree_widths) if args.tree_widths else None,
        prompt_lookup_tokens=args.prompt_lookup_tokens,
        seed=args.seed,
    )
    with cli_logging():
        result = evaluate(
            spec,
            prompts,
            args.methods,
            settings,
            workers=args.workers,
            timing_prompts=args.timing_prompts,
            batch_size=args.batch_size,
        )
    device = resolve_device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtype_name = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    header = (
        f"glide-hf bench: target `{args.target}`, draft `{args.draft}`, assistant `{args.assistant}`; {device_name}, "
        f"{dtype_name}"
    )
    if args.output_json:
        payload = {
            "arguments": dataclasses.asdict(args),
            "command": " ".join([prog, *argv]),
            "device": device_name,
            "dtype": dtype_name,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            **result.to_dict(),
        }
        with open(args.output_json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
    if args.plot:
        plot_summaries(result.summaries, args.plot, title=header)
    print(header)
    print(format_notes(result))
    print()
    print(format_table(result.summaries))
    return 1 if result.errors else 0


__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "BATCHABLE_METHODS",
    "BatchJob",
    "BenchArguments",
    "BenchModels",
    "BenchResult",
    "DecodingSettings",
    "Job",
    "JobRecord",
    "MethodSummary",
    "ModelSpec",
    "STOCK_METHODS",
    "build_jobs",
    "configure_assisted_decoding",
    "count_forward_calls",
    "evaluate",
    "format_notes",
    "format_table",
    "generate_batch_continuations",
    "generate_continuation",
    "is_looping",
    "load_models",
    "load_prompts",
    "parse_bench_args",
    "plot_summaries",
    "run_any_job",
    "run_batch_job",
    "run_cli",
    "run_job",
    "runs_batched",
    "summarize",
]
