"""End-to-end GLIDE demo on CPU in a few minutes, with nothing downloaded: `python -m glide_hf.demo`.

The demo trains both models it needs from text that ships with Python itself:

1. corpus: the `.py` sources of the running interpreter's standard library (test folders left out), in a seeded
   shuffle of the sorted file list; the first `num_eval_files` files are held out for evaluation.
2. tokenizer: a byte-level BPE trained on the training files with `tokenizers` (about a second).
3. target: a small `LlamaForCausalLM` trained with a plain AdamW loop within a step and time budget.
4. draft: `GlideForCausalLM.from_target(target)` trained with a stock `transformers.Trainer`, by default on the
   target's own greedy next tokens (self-distillation), which is what greedy assisted decoding accepts.
5. evaluation: greedy `target.generate` with and without `assistant_model=draft`, one held-out prompt at a time.
   The two outputs must be identical (greedy assisted decoding is lossless in fp32); the speed-up is reported as
   tokens per target forward (counted with a forward pre-hook) and as wall-clock.

This is a user-facing script, so `main` prints its result table. `run_demo` returns everything as `DemoResults`
for tests and other callers; sizes and budgets are the fields of `DemoArguments`, one flag each. The GLIDE model
itself lives in `modeling_glide.py`; nothing here changes how it drafts or trains.
"""

import dataclasses
import json
import logging as pylogging
import math
import random
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging

from .bench import count_forward_calls
from .loss import IGNORE_INDEX
from .modeling_glide import GlideForCausalLM

logger = logging.get_logger(__name__)

# Standard-library folders left out of the corpus: installed third-party packages, and test suites, which hold
# deliberately odd files (bad encodings, huge generated data) that make poor training text.
SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
END_OF_TEXT = "<|endoftext|>"
PACKAGE_LOGGER_NAME = "glide_hf"
SAMPLE_SEPARATOR = "\u2588"  # a full block, marking where the prompt ends in the printed sample


@dataclass
class DemoArguments:
    """Sizes and budgets of the demo. The defaults take about three minutes on two idle CPU cores.

    Each training stops at its step budget or its time budget, whichever comes first. On two idle cores the step
    budgets end both trainings, so results are reproducible; on a slower or busy machine the time budgets bound the
    run instead, at the cost of a less trained target and draft.
    """

    seed: int = field(default=0, metadata={"help": "Seed of the file shuffle, initialisation and batch order."})
    corpus_max_bytes: int = field(
        default=3_000_000, metadata={"help": "Stop reading standard-library files once this many bytes are read."}
    )
    max_file_bytes: int = field(
        default=200_000, metadata={"help": "Skip files larger than this (mostly generated tables and data)."}
    )
    num_eval_files: int = field(default=12, metadata={"help": "Files held out for evaluation losses and prompts."})
    vocab_size: int = field(default=2048, metadata={"help": "Size of the byte-level BPE vocabulary (>= 257)."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per training sequence, for target and draft."})
    # Small on purpose: in a minute and a half on two cores, a 1.3M-parameter target gets further than a larger one.
    hidden_size: int = field(default=128, metadata={"help": "Hidden size of the target (and so of the draft)."})
    intermediate_size: int = field(default=344, metadata={"help": "MLP width of the target and the draft."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Decoder layers of the target."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads of the target and the draft."})
    num_key_value_heads: int = field(default=2, metadata={"help": "Key/value heads of the target and the draft."})
    target_batch_size: int = field(default=16, metadata={"help": "Sequences per target training step."})
    target_learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate of the target."})
    target_max_steps: int = field(default=400, metadata={"help": "Most target training steps."})
    target_max_seconds: float = field(default=110.0, metadata={"help": "Most seconds of target training."})
    target_warmup_steps: int = field(default=20, metadata={"help": "Linear warm-up steps of the target."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay, target and draft."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm, target and draft."})
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "Final learning rate of the cosine decay, as a fraction of the peak."}
    )
    sliding_window: int = field(default=64, metadata={"help": "The draft's self-attention window (LongSpec's W)."})
    num_draft_tokens: int = field(default=5, metadata={"help": "Tokens the draft proposes per round (gamma)."})
    max_draft_lag: int = field(
        default=5, metadata={"help": "Upper bound of the random training lag; at least `num_draft_tokens`."}
    )
    draft_labels: Literal["target", "corpus"] = field(
        default="target",
        metadata={
            "help": "What the draft learns to predict: the target's greedy next token on corpus text "
            "(self-distillation) or the corpus's next token."
        },
    )
    draft_batch_size: int = field(default=16, metadata={"help": "Sequences per draft training step."})
    draft_learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate of the draft."})
    draft_max_steps: int = field(default=250, metadata={"help": "Most draft training steps."})
    draft_max_seconds: float = field(default=80.0, metadata={"help": "Most seconds of draft training."})
    draft_warmup_steps: int = field(default=10, metadata={"help": "Linear warm-up steps of the draft."})
    draft_logging_steps: int = field(default=25, metadata={"help": "Trainer logs the draft's loss every n steps."})
    num_eval_sequences: int = field(
        default=16, metadata={"help": "Held-out sequences of `seq_len` tokens for the evaluation losses."}
    )
    num_eval_prompts: int = field(default=8, metadata={"help": "Held-out prompts for the generation comparison."})
    prompt_tokens: int = field(default=64, metadata={"help": "Tokens per prompt."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per prompt."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the results to this JSON file."})

    def check(self) -> None:
        """Raise `ValueError` naming the offending flags when the settings contradict each other."""
        if self.vocab_size < 257:
            raise ValueError(f"`vocab_size` must be at least 257 (256 bytes and one special), got {self.vocab_size}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by `num_key_value_heads` "
                f"({self.num_key_value_heads})."
            )
        if self.max_draft_lag < self.num_draft_tokens:
            raise ValueError(
                f"`max_draft_lag` ({self.max_draft_lag}) must be at least `num_draft_tokens` "
                f"({self.num_draft_tokens}): the last draft step of a round sees target keys that many tokens back."
            )
        if min(self.num_eval_files, self.num_eval_sequences, self.num_eval_prompts, self.max_new_tokens) < 1:
            raise ValueError(
                "`num_eval_files`, `num_eval_sequences`, `num_eval_prompts` and `max_new_tokens` must be positive."
            )


@dataclass
class DemoResults:
    """What the demo measured. Losses are mean next-token cross-entropies (nats) on held-out sequences."""

    target_eval_loss: float
    draft_eval_loss_before: float
    draft_eval_loss_after: float
    draft_agreement_before: float  # fraction of held-out positions where the draft's top-1 equals the target's
    draft_agreement_after: float
    target_train_steps: int
    draft_train_steps: int
    num_prompts: int
    new_tokens: int  # over all prompts; the same for both runs when the outputs are identical
    target_forwards_vanilla: int
    target_forwards_assisted: int
    vanilla_seconds: float
    assisted_seconds: float
    engine_seconds: float  # all prompts as one batch through the GLIDE engine (`draft.generate`)
    engine_tokens_per_target_forward: float  # per row: new tokens over the target forwards that row took part in
    outputs_identical: bool
    num_mismatched_prompts: int
    sample_prompt: str
    sample_continuation: str

    @property
    def tokens_per_target_forward(self) -> float:
        """Mean accepted tokens per target forward in assisted decoding (tau); 1.0 means no draft token accepted."""
        return self.new_tokens / max(self.target_forwards_assisted, 1)

    @property
    def speedup(self) -> float:
        """Wall-clock of plain greedy decoding over that of assisted decoding."""
        return self.vanilla_seconds / max(self.assisted_seconds, 1e-9)


@dataclass
class TrainingBudget:
    """Stop training after `max_steps` or `max_seconds`, whichever comes first.

    The learning rate follows the fraction of the budget used (the larger of the step and the time fraction), so a
    run that the clock cuts short still finishes its cosine decay instead of stopping at the peak rate.
    """

    max_steps: int
    max_seconds: float
    warmup_steps: int
    min_lr_ratio: float
    start_time: float | None = None

    def start(self) -> None:
        self.start_time = time.monotonic()

    def elapsed(self) -> float:
        return 0.0 if self.start_time is None else time.monotonic() - self.start_time

    def progress(self, step: int) -> float:
        return min(1.0, max(step / self.max_steps, self.elapsed() / self.max_seconds))

    def exhausted(self, step: int) -> bool:
        return self.progress(step) >= 1.0

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate: linear warm-up, then cosine decay to `min_lr_ratio`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


class BudgetCallback(TrainerCallback):
    """Lets `Trainer` stop on a `TrainingBudget` (its `max_steps` alone cannot bound the time)."""

    def __init__(self, budget: TrainingBudget):
        self.budget = budget

    def on_train_begin(self, args, state, control, **kwargs):
        self.budget.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.budget.exhausted(state.global_step):
            control.should_training_stop = True


def read_stdlib_sources(args: DemoArguments) -> tuple[list[str], list[str]]:
    """Read standard-library `.py` files until `corpus_max_bytes`; return `(train_texts, eval_texts)`.

    The sorted file list is shuffled with `seed` so that the corpus mixes packages instead of being the
    alphabetically first few; files that are not UTF-8 are skipped.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        path for path in stdlib.rglob("*.py") if not SKIPPED_STDLIB_DIRS & set(path.relative_to(stdlib).parts[:-1])
    )
    random.Random(args.seed).shuffle(paths)
    texts, num_bytes = [], 0
    for path in paths:
        if not path.is_file() or path.stat().st_size > args.max_file_bytes:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        num_bytes += len(text.encode("utf-8"))
        if num_bytes >= args.corpus_max_bytes:
            break
    if len(texts) <= args.num_eval_files:
        raise ValueError(
            f"Found {len(texts)} usable standard-library files under `{stdlib}` within `corpus_max_bytes`="
            f"{args.corpus_max_bytes}, but `num_eval_files`={args.num_eval_files} are held out: raise "
            "`corpus_max_bytes` or lower `num_eval_files`."
        )
    logger.info(f"Corpus: {len(texts)} files, {num_bytes / 1e6:.2f} MB from {stdlib}")
    return texts[args.num_eval_files :], texts[: args.num_eval_files]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style: every byte is a token, so any text round-trips) on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def tokenize_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.LongTensor:
    """All `texts` as one token stream `[N]`, each file followed by the end-of-text token."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([token for ids in encoded for token in [*ids, tokenizer.eos_token_id]], dtype=torch.long)


def split_into_sequences(stream: torch.LongTensor, seq_len: int) -> torch.LongTensor:
    """Cut a token stream into consecutive sequences `[num_sequences, seq_len]`, dropping the remainder."""
    num_sequences = stream.numel() // seq_len
    return stream[: num_sequences * seq_len].view(num_sequences, seq_len)


def build_target(args: DemoArguments, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised small Llama sized by `args`."""
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        max_position_embeddings=max(args.seq_len, args.prompt_tokens + args.max_new_tokens),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def train_target(target: LlamaForCausalLM, sequences: torch.LongTensor, args: DemoArguments) -> int:
    """Train `target` on random batches of `sequences` `[N, T]` with AdamW; return the number of steps taken."""
    budget = TrainingBudget(
        args.target_max_steps, args.target_max_seconds, args.target_warmup_steps, args.min_lr_ratio
    )
    optimizer = torch.optim.AdamW(target.parameters(), lr=args.target_learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, budget.lr_factor)
    generator = torch.Generator().manual_seed(args.seed)
    target.train()
    budget.start()
    step = 0
    with logging.tqdm(total=args.target_max_steps, desc="target", unit="step") as progress_bar:
        while not budget.exhausted(step):
            batch = sequences[torch.randint(len(sequences), (args.target_batch_size,), generator=generator)]
            loss = target(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(target.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress_bar.update()
            progress_bar.set_postfix(loss=f"{loss.item():.3f}")
    target.eval()
    logger.info(f"Target trained for {step} steps in {budget.elapsed():.0f} s")
    return step


@torch.no_grad()
def target_greedy_tokens(target: PreTrainedModel, sequences: torch.LongTensor, batch_size: int) -> torch.LongTensor:
    """The target's greedy next token at every position of `sequences` `[N, T]`, as `[N, T]`."""
    return torch.cat([target(input_ids=batch).logits.argmax(-1) for batch in sequences.split(batch_size)])


def shifted_labels(next_tokens: torch.LongTensor) -> torch.LongTensor:
    """Labels in the causal-LM convention (the model shifts them) from next tokens: `labels[:, t + 1]` is the token
    predicted at position t, so `next_tokens[:, t]` moves to `t + 1` and position 0 is ignored."""
    ignored = next_tokens.new_full((next_tokens.shape[0], 1), IGNORE_INDEX)
    return torch.cat([ignored, next_tokens[:, :-1]], dim=1)


@dataclass
class DraftBatchCollator:
    """Stack `{"input_ids": [T]}` features into a draft training batch.

    With a `target`, the labels are the target's greedy next tokens (self-distillation): greedy verification accepts
    a draft token exactly when it equals the target's argmax, so that is what the draft should learn, whatever the
    target's own errors on the corpus. Labelling here, batch by batch, costs one no-grad target forward per step
    actually taken, which keeps it inside the draft's time budget. Without a target, the labels are the corpus tokens.
    """

    target: PreTrainedModel | None = None

    @torch.no_grad()
    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        input_ids = torch.stack([feature["input_ids"] for feature in features])  # [B, T]
        if self.target is None:
            return {"input_ids": input_ids, "labels": input_ids.clone()}
        next_tokens = self.target(input_ids=input_ids).logits.argmax(-1)
        return {"input_ids": input_ids, "labels": shifted_labels(next_tokens)}


@torch.no_grad()
def evaluate_target(target: PreTrainedModel, sequences: torch.LongTensor, batch_size: int) -> float:
    """Mean next-token cross-entropy of the target on `sequences` `[N, T]`."""
    target.eval()
    losses = [target(input_ids=batch, labels=batch).loss for batch in sequences.split(batch_size)]
    return torch.stack(losses).mean().item()


@torch.no_grad()
def evaluate_draft(
    draft: GlideForCausalLM,
    sequences: torch.LongTensor,
    labels: torch.LongTensor,
    target_next_tokens: torch.LongTensor,
    batch_size: int,
) -> tuple[float, float]:
    """The draft's mean loss against `labels` and its top-1 agreement with the target's greedy tokens.

    Eval mode: a query at token t sees target keys of tokens <= t - 1, as in the first draft step of a round.
    `labels` `[N, T]` are shifted labels (see `shifted_labels`) of the kind the draft trains on;
    `target_next_tokens` `[N, T]` come from `target_greedy_tokens`.
    """
    draft.eval()
    losses, agreements = [], []
    batches = zip(sequences.split(batch_size), labels.split(batch_size), target_next_tokens.split(batch_size))
    for batch, batch_labels, batch_target_next in batches:
        outputs = draft(input_ids=batch, labels=batch_labels, return_logits=True)
        losses.append(outputs.loss)
        agreements.append((outputs.logits.argmax(-1) == batch_target_next).float().mean())
    return torch.stack(losses).mean().item(), torch.stack(agreements).mean().item()


def train_draft(
    draft: GlideForCausalLM,
    dataset: list[dict[str, torch.Tensor]],
    collator: DraftBatchCollator,
    args: DemoArguments,
    output_dir: str,
) -> int:
    """Train the draft's own parameters with a stock `Trainer`; return the number of steps taken."""
    budget = TrainingBudget(args.draft_max_steps, args.draft_max_seconds, args.draft_warmup_steps, args.min_lr_ratio)
    # `from_target` froze the target, so these are the draft layer's parameters only.
    trainable = [parameter for parameter in draft.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.draft_learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, budget.lr_factor)
    training_args = TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=args.draft_batch_size,
        max_steps=args.draft_max_steps,
        max_grad_norm=args.max_grad_norm,
        logging_steps=args.draft_logging_steps,
        save_strategy="no",
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=draft,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        optimizers=(optimizer, scheduler),
        callbacks=[BudgetCallback(budget)],
    )
    trainer.train()
    draft.eval()
    steps = trainer.state.global_step
    logger.info(f"Draft trained for {steps} steps in {budget.elapsed():.0f} s")
    return steps


@dataclass
class _GenerationStats:
    outputs: list[torch.LongTensor] = field(default_factory=list)
    target_forwards: int = 0
    seconds: float = 0.0


def _generate(target: PreTrainedModel, prompt: torch.LongTensor, stats: _GenerationStats, **kwargs) -> None:
    input_ids = prompt[None]
    with count_forward_calls(target) as counter:
        start = time.perf_counter()
        output = target.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, **kwargs)
        stats.seconds += time.perf_counter() - start
    stats.target_forwards += counter.count
    stats.outputs.append(output[0, input_ids.shape[1] :])


def compare_generation(
    target: PreTrainedModel, draft: GlideForCausalLM, prompts: list[torch.LongTensor], max_new_tokens: int
) -> tuple[_GenerationStats, _GenerationStats]:
    """Greedy generation of every prompt (batch size 1), without and with the draft as assistant."""
    target.eval()
    draft.eval()
    # One untimed call of each first: the first `generate` pays one-off set-up costs that would skew the timing.
    _generate(target, prompts[0], _GenerationStats(), max_new_tokens=max_new_tokens)
    _generate(target, prompts[0], _GenerationStats(), max_new_tokens=max_new_tokens, assistant_model=draft)
    vanilla, assisted = _GenerationStats(), _GenerationStats()
    for prompt in logging.tqdm(prompts, desc="generate", unit="prompt"):
        _generate(target, prompt, vanilla, max_new_tokens=max_new_tokens)
        _generate(target, prompt, assisted, max_new_tokens=max_new_tokens, assistant_model=draft)
    return vanilla, assisted


def engine_generation(
    draft: GlideForCausalLM, prompts: list[torch.LongTensor], max_new_tokens: int, num_draft_tokens: int
) -> tuple[list[torch.LongTensor], float, float]:
    """Greedy generation of all prompts as one batch with the GLIDE engine: outputs per prompt, seconds, and the
    mean tokens per target forward of a row."""
    batch = torch.stack(prompts)
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, num_draft_tokens=num_draft_tokens)
    draft.generate(batch[:1], **settings)  # untimed: one-off set-up costs
    start = time.perf_counter()
    out = draft.generate(batch, attention_mask=torch.ones_like(batch), return_dict_in_generate=True, **settings)
    seconds = time.perf_counter() - start
    prompt_length = batch.shape[1]
    outputs = [out.sequences[row, prompt_length : prompt_length + out.new_tokens[row]] for row in range(len(prompts))]
    forwards_per_row = (out.accepted_per_round >= 0).sum(0) + 1  # rounds the row took part in, plus the prefill
    return outputs, seconds, float(out.new_tokens.sum() / forwards_per_row.sum())


def select_prompts(stream: torch.LongTensor, num_prompts: int, prompt_tokens: int) -> list[torch.LongTensor]:
    """`num_prompts` windows of `prompt_tokens` tokens, evenly spaced over a held-out token stream."""
    last_start = stream.numel() - prompt_tokens
    if last_start < 0:
        raise ValueError(
            f"The held-out stream has {stream.numel()} tokens, fewer than `prompt_tokens`={prompt_tokens}: raise "
            "`num_eval_files` or lower `prompt_tokens`."
        )
    starts = torch.linspace(0, last_start, num_prompts).long().tolist()
    return [stream[start : start + prompt_tokens] for start in starts]


def run_demo(args: DemoArguments) -> DemoResults:
    """Build the corpus, tokenizer, target and draft, then compare plain and assisted greedy decoding."""
    args.check()
    torch.manual_seed(args.seed)
    train_texts, eval_texts = read_stdlib_sources(args)

    start = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_stream, eval_stream = tokenize_stream(tokenizer, train_texts), tokenize_stream(tokenizer, eval_texts)
    logger.info(
        f"Tokenizer: byte-level BPE, {len(tokenizer)} tokens, trained in {time.perf_counter() - start:.1f} s; "
        f"{train_stream.numel()} training and {eval_stream.numel()} held-out tokens"
    )
    train_sequences = split_into_sequences(train_stream, args.seq_len)
    # The evaluation losses use the start of the held-out stream, the prompts are spread over all of it.
    eval_sequences = split_into_sequences(eval_stream, args.seq_len)[: args.num_eval_sequences]
    if len(eval_sequences) == 0:
        raise ValueError(
            f"The held-out files hold fewer than `seq_len`={args.seq_len} tokens: raise `num_eval_files`."
        )
    prompts = select_prompts(eval_stream, args.num_eval_prompts, args.prompt_tokens)

    target = build_target(args, tokenizer)
    logger.info(f"Target: Llama with {target.num_parameters() / 1e6:.2f}M parameters")
    target_steps = train_target(target, train_sequences, args)
    target_loss = evaluate_target(target, eval_sequences, args.target_batch_size)
    logger.info(f"Target held-out loss: {target_loss:.3f}")

    draft = GlideForCausalLM.from_target(
        target,
        sliding_window=args.sliding_window,
        num_draft_tokens=args.num_draft_tokens,
        max_draft_lag=args.max_draft_lag,
    )
    num_draft_parameters = sum(parameter.numel() for parameter in draft.parameters() if parameter.requires_grad)
    logger.info(f"Draft: one GLIDE layer with {num_draft_parameters / 1e6:.2f}M trainable parameters")

    collator = DraftBatchCollator(target=target if args.draft_labels == "target" else None)
    dataset = [{"input_ids": sequence} for sequence in train_sequences]
    eval_labels = collator([{"input_ids": sequence} for sequence in eval_sequences])["labels"]
    eval_target_next = target_greedy_tokens(target, eval_sequences, args.draft_batch_size)

    draft_loss_before, agreement_before = evaluate_draft(
        draft, eval_sequences, eval_labels, eval_target_next, args.draft_batch_size
    )
    with tempfile.TemporaryDirectory(prefix="glide_demo_") as output_dir:
        draft_steps = train_draft(draft, dataset, collator, args, output_dir)
    draft_loss_after, agreement_after = evaluate_draft(
        draft, eval_sequences, eval_labels, eval_target_next, args.draft_batch_size
    )
    logger.info(f"Draft held-out loss: {draft_loss_before:.3f} before, {draft_loss_after:.3f} after training")

    vanilla, assisted = compare_generation(target, draft, prompts, args.max_new_tokens)
    engine_outputs, engine_seconds, engine_tau = engine_generation(
        draft, prompts, args.max_new_tokens, args.num_draft_tokens
    )
    mismatched = []
    for index, plain in enumerate(vanilla.outputs):
        for name, other in (("assisted", assisted.outputs[index]), ("engine", engine_outputs[index])):
            if not torch.equal(plain, other):
                mismatched.append(index)
                logger.error(
                    f"Prompt {index}: {name} greedy output differs from the target's own greedy output "
                    f"({plain.tolist()} vs {other.tolist()}). Greedy decoding with the draft must be lossless in "
                    "fp32: this is a bug."
                )
    mismatched = sorted(set(mismatched))
    return DemoResults(
        target_eval_loss=target_loss,
        draft_eval_loss_before=draft_loss_before,
        draft_eval_loss_after=draft_loss_after,
        draft_agreement_before=agreement_before,
        draft_agreement_after=agreement_after,
        target_train_steps=target_steps,
        draft_train_steps=draft_steps,
        num_prompts=len(prompts),
        new_tokens=sum(output.numel() for output in assisted.outputs),
        target_forwards_vanilla=vanilla.target_forwards,
        target_forwards_assisted=assisted.target_forwards,
        vanilla_seconds=vanilla.seconds,
        assisted_seconds=assisted.seconds,
        engine_seconds=engine_seconds,
        engine_tokens_per_target_forward=engine_tau,
        outputs_identical=not mismatched,
        num_mismatched_prompts=len(mismatched),
        sample_prompt=tokenizer.decode(prompts[0]),
        sample_continuation=tokenizer.decode(assisted.outputs[0]),
    )


def format_results(results: DemoResults, args: DemoArguments) -> str:
    """The result table and one decoded sample, as printed by `main`."""
    vanilla_tau = results.new_tokens / max(results.target_forwards_vanilla, 1)
    identical = "yes" if results.outputs_identical else f"NO ({results.num_mismatched_prompts} prompts differ)"
    rows = [
        ("target loss (held-out)", f"{results.target_eval_loss:.3f}"),
        (
            f"draft loss (labels: {args.draft_labels})",
            f"{results.draft_eval_loss_before:.3f} -> {results.draft_eval_loss_after:.3f}",
        ),
        ("draft top-1 = target top-1", f"{results.draft_agreement_before:.1%} -> {results.draft_agreement_after:.1%}"),
        ("training steps target / draft", f"{results.target_train_steps} / {results.draft_train_steps}"),
        ("prompts x new tokens", f"{results.num_prompts} x {args.max_new_tokens} (gamma={args.num_draft_tokens})"),
        (
            "target forwards vanilla / assisted",
            f"{results.target_forwards_vanilla} / {results.target_forwards_assisted}",
        ),
        ("tokens per target forward", f"{vanilla_tau:.2f} -> {results.tokens_per_target_forward:.2f}"),
        ("wall-clock vanilla / assisted", f"{results.vanilla_seconds:.2f} s / {results.assisted_seconds:.2f} s"),
        ("speed-up, stock assisted path", f"{results.speedup:.2f}x"),
        (
            f"GLIDE engine, batch of {results.num_prompts}",
            f"{results.engine_tokens_per_target_forward:.2f} tokens/forward, {results.engine_seconds:.2f} s "
            f"({results.vanilla_seconds / max(results.engine_seconds, 1e-9):.2f}x vanilla)",
        ),
        ("greedy outputs identical", identical),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["GLIDE demo results", "-" * (width + 24)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    if results.speedup < 1.0:
        lines += [
            "",
            "Note: this target is so small that one of its forwards costs about as much as a draft step plus the",
            "per-round Python overhead of Transformers' assisted decoding (`target.generate(assistant_model=...)`),",
            "so fewer target forwards do not save time on that path here; the GLIDE engine (`draft.generate`) runs",
            "the same draft on a batch with far less overhead per round.",
        ]
    lines += ["", "Sample (held-out prompt, then the greedy continuation after the block):"]
    lines += [results.sample_prompt + SAMPLE_SEPARATOR + results.sample_continuation]
    return "\n".join(lines)


@contextmanager
def _demo_logging() -> Iterator[None]:
    """Show glide_hf's info logs on stderr for the duration of the demo, then restore the loggers as they were.

    Only glide_hf's loggers change: Transformers and other libraries keep their own verbosity.
    """
    loggers = [pylogging.getLogger(PACKAGE_LOGGER_NAME)]
    if not logger.name.startswith(f"{PACKAGE_LOGGER_NAME}."):
        # `python -m glide_hf.demo` runs this file as `__main__`, whose logger is outside the package's hierarchy.
        loggers.append(logger)
    handler = pylogging.StreamHandler(sys.stderr)
    handler.setFormatter(pylogging.Formatter("[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S"))
    previous_levels = [configured.level for configured in loggers]
    for configured in loggers:
        configured.addHandler(handler)
        configured.setLevel(pylogging.INFO)
    try:
        yield
    finally:
        for configured, level in zip(loggers, previous_levels):
            configured.removeHandler(handler)
            configured.setLevel(level)


def parse_args(argv: list[str] | None = None) -> DemoArguments:
    """Parse `argv` (default: the command line) into `DemoArguments`; exit with status 2 on contradictory flags.

    Flags are the field names, with `_` or `-` (`--max_new_tokens` or `--max-new-tokens`).
    """
    parser = HfArgumentParser(DemoArguments, description=__doc__.split("\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        args.check()
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the demo with flags from `argv` (default: the command line); return 0 when the outputs were identical."""
    args = parse_args(argv)
    with _demo_logging():
        results = run_demo(args)
    print(format_results(results, args))
    if args.output_json:
        payload = dataclasses.asdict(results) | {
            "tokens_per_target_forward": results.tokens_per_target_forward,
            "speedup": results.speedup,
        }
        Path(args.output_json).write_text(json.dumps(payload, indent=2))
    if not results.outputs_identical:
        print(
            f"ERROR: assisted greedy decoding changed the output for {results.num_mismatched_prompts} of "
            f"{results.num_prompts} prompts.",
            file=sys.stderr,
        )
        return 1
    return 0


__all__ = [
    "BudgetCallback",
    "DemoArguments",
    "DemoResults",
    "DraftBatchCollator",
    "TrainingBudget",
    "main",
    "parse_args",
    "run_demo",
    "train_tokenizer",
]


if __name__ == "__main__":
    raise SystemExit(main())
