"""Issue 5: a self-trained target and its GLIDE draft on one GPU, against every baseline, in one run.

Phases (each budgeted by its flags and timed; `--tiny` runs the same code on the CPU in seconds):

1. corpus: the Python sources of this interpreter (standard library and site-packages), read in a deterministic
   order. Whole packages are held out for evaluation (`--heldout-packages`, default sympy and networkx; when they
   are absent, the largest packages that are each at most a tenth of the corpus); no file of theirs, nor any
   training file with the same content, is trained on.
2. tokenizer: a byte-level BPE trained with `tokenizers` on the training files, saved as `PreTrainedTokenizerFast`.
3. target: a Llama (`--arch qwen2` for Qwen2) trained from scratch with a plain PyTorch loop: AdamW, warm-up and
   cosine decay, bf16 autocast on CUDA, until `--target-seconds`.
4. draft data: self-distillation (default): the target's own greedy and sampled continuations of training
   windows, generated in large batches; or (`--draft-data corpus`) windows of the training corpus.
5. GLIDE draft: `glide_hf.trainer.build_glide_trainer` (the package's training path: `GlideTrainingArguments`,
   its data pipeline and collator, a stock `Trainer`, liger's fused loss when installed) for `--draft-seconds`.
6. independent draft: a one-layer `LlamaForCausalLM` with its own (tied) embedding and head, sized to the GLIDE
   draft's trainable parameter count, trained by a stock `Trainer` on the same rows for the same time.
7. evaluation: `glide_hf.bench.evaluate` on held-out prompts, greedy and at temperature 0.7: vanilla generate,
   stock assisted decoding with each draft, prompt lookup, and the engine (chain, tree, CAPE); the target in fp32
   by default (`--eval-dtype`), so that greedy outputs must agree exactly. The engine and sampled vanilla run their
   tau pass in left-padded batches (`--eval-batch-size`); the stock paths and vanilla greedy at batch 1; speed is
   timed at batch 1.

Written to `--out`: `results.json` (everything, updated after each phase), `results.md` (the table and notes),
`results.png` (tau and speedup per method), `run.log` (what was printed); models, tokenizer and data go to
`--work-dir`. The table is printed last.

Run: `python benchmarks/selftrained/run.py --out DIR --work-dir /tmp/selftrained` (GPU, about 8.5 minutes with
the defaults), or `--tiny` on a CPU.
"""

import dataclasses
import hashlib
import importlib
import json
import math
import os
import platform
import random
import site
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Trainer,
    TrainingArguments,
)

from glide_hf import demo
from glide_hf.bench import (
    ENGINE_STRATEGIES,
    METHODS,
    DecodingSettings,
    ModelSpec,
    evaluate,
    format_notes,
    format_table,
    plot_summaries,
)
from glide_hf.demo import BudgetCallback, TrainingBudget
from glide_hf.loss import resolve_loss_implementation
from glide_hf.trainer import GlideTrainingArguments, build_glide_trainer

# Standard-library folders left out: installed packages (read from their own roots) and test suites, which hold
# deliberately odd files (bad encodings, huge generated data). Our own package is never training text.
STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
SKIPPED_PACKAGES = frozenset({"glide_hf"})
# Fallback hold-out: packages of at most this fraction of the corpus, largest first.
FALLBACK_HELDOUT_MAX_FRACTION = 0.1
# Files read concurrently (I/O bound).
READ_THREADS = 16
# Files per `encode_batch` call: bounds the memory of the encodings held at once.
ENCODE_CHUNK_FILES = 2048
# Head dimension of the independent draft (a multiple of it is its hidden size).
INDEPENDENT_HEAD_DIM = 32
# Llama's MLP ratio, the shape the independent draft's size search aims for.
TARGET_MLP_RATIO = 8 / 3
# AdamW settings of all three models besides the learning rates: betas of small-LM pre-training, and the drafts'
# weight decay (the target's is a flag).
ADAM_BETAS = (0.9, 0.95)
DRAFT_WEIGHT_DECAY = 0.01
# Gradient clipping norm of all three models.
MAX_GRAD_NORM = 1.0
# Files handed to the reading threads at once.
READ_BATCH_FILES = 256


@dataclass
class SelfTrainedArguments:
    """Every setting of the benchmark, one flag each (`--target-seconds` or `--target_seconds`)."""

    out: str = field(default="selftrained_out", metadata={"help": "Folder for results.json, results.md, the PNG."})
    work_dir: str | None = field(
        default=None, metadata={"help": "Folder for models, tokenizer and data. Default: `<out>/work`."}
    )
    tiny: bool = field(
        default=False,
        metadata={"help": "CPU smoke-test sizes (seconds): every setting still at its default takes its tiny value."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of file order, initialisation, batches, data, sampling."})
    device: str | None = field(default=None, metadata={"help": "Default: cuda when available."})
    deadline_seconds: float = field(
        default=480.0,
        metadata={
            "help": "The evaluation starts no new prompt after this many seconds from the start of `main`, so the "
            "whole run ends within about this plus the time of writing results."
        },
    )
    # corpus
    corpus: Literal["all", "stdlib"] = field(
        default="all", metadata={"help": "`all`: standard library and site-packages; `stdlib`: the former only."}
    )
    heldout_packages: list[str] = field(
        default_factory=lambda: ["sympy", "networkx"],
        metadata={"help": "Top-level packages held out for evaluation (those present are used)."},
    )
    min_heldout_bytes: int = field(
        default=2_000_000, metadata={"help": "Below this, other packages are added to the hold-out (largest first)."}
    )
    max_heldout_bytes: int = field(default=5_000_000, metadata={"help": "Held-out bytes read at most."})
    corpus_bytes: int = field(default=160_000_000, metadata={"help": "Training bytes read at most."})
    max_files: int | None = field(default=None, metadata={"help": "Training files read at most."})
    max_file_bytes: int = field(default=500_000, metadata={"help": "Larger files (mostly generated) are skipped."})
    # tokenizer
    vocab_size: int = field(default=8192, metadata={"help": "Byte-level BPE vocabulary (special token included)."})
    tokenizer_train_bytes: int = field(default=20_000_000, metadata={"help": "Training bytes the BPE learns from."})
    # target
    arch: Literal["llama", "qwen2"] = field(default="llama", metadata={"help": "Target architecture."})
    target_layers: int = field(default=8, metadata={"help": "Target decoder layers."})
    target_hidden_size: int = field(default=512, metadata={"help": "Target hidden size."})
    target_intermediate_size: int = field(default=1408, metadata={"help": "Target MLP width."})
    target_heads: int = field(default=8, metadata={"help": "Target attention heads."})
    target_kv_heads: int = field(default=4, metadata={"help": "Target key/value heads."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per training row (target and drafts)."})
    target_batch_size: int = field(default=64, metadata={"help": "Rows per target step."})
    target_lr: float = field(default=1.5e-3, metadata={"help": "Peak AdamW learning rate of the target."})
    target_weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)."})
    target_warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    target_seconds: float = field(default=60.0, metadata={"help": "Target training time budget."})
    target_max_steps: int = field(default=1_000_000, metadata={"help": "Target training step budget."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Final learning rate over the peak (target, drafts)."})
    log_every: int = field(default=25, metadata={"help": "Target steps between loss readings (host syncs)."})
    heldout_eval_rows: int = field(default=64, metadata={"help": "Held-out rows of `seq_len` for the target loss."})
    # draft data
    draft_data: Literal["distill", "corpus"] = field(
        default="distill",
        metadata={"help": "Draft training text: the target's own continuations of training windows, or the corpus."},
    )
    distill_seconds: float = field(default=15.0, metadata={"help": "Time budget of the self-distillation batches."})
    distill_max_batches: int = field(default=1000, metadata={"help": "Most self-distillation batches."})
    distill_batch_size: int = field(default=4096, metadata={"help": "Prompts generated in one batch."})
    distill_min_prompt_tokens: int = field(default=32, metadata={"help": "Shortest distillation prompt."})
    distill_max_prompt_tokens: int = field(default=224, metadata={"help": "Longest distillation prompt."})
    distill_new_tokens: int = field(default=256, metadata={"help": "Tokens generated per distillation prompt."})
    distill_sample_fraction: float = field(
        default=0.5, metadata={"help": "Share of each batch's rows sampled at `distill_temperature` (others greedy)."}
    )
    distill_temperature: float = field(default=0.7, metadata={"help": "Temperature of the sampled rows."})
    draft_corpus_tokens: int = field(
        default=20_000_000, metadata={"help": "With `--draft-data corpus`: tokens of corpus windows written."}
    )
    # drafts
    sliding_window: int = field(default=512, metadata={"help": "GLIDE self-attention window (LongSpec's W)."})
    num_draft_tokens: int = field(default=5, metadata={"help": "Draft tokens per round (assisted, chain, CAPE)."})
    max_draft_lag: int = field(
        default=6, metadata={"help": "GLIDE training lag upper bound: at least the tree depth + 1."}
    )
    draft_batch_size: int = field(default=64, metadata={"help": "Rows of `seq_len` per draft step (both drafts)."})
    draft_lr: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate (both drafts)."})
    draft_warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up steps (both drafts)."})
    draft_seconds: float = field(default=20.0, metadata={"help": "Training time of each draft."})
    draft_max_steps: int = field(default=1_000_000, metadata={"help": "Training steps of each draft, at most."})
    draft_eval_fraction: float = field(default=0.01, metadata={"help": "Draft rows held out for the draft losses."})
    draft_logging_steps: int = field(default=25, metadata={"help": "Trainer logs the loss every n steps."})
    independent_tied_embeddings: bool = field(
        default=True, metadata={"help": "Tie the independent draft's embedding and head (more width per parameter)."}
    )
    # evaluation
    num_prompts: int = field(default=50, metadata={"help": "Held-out prompts."})
    prompt_tokens: int = field(default=224, metadata={"help": "Tokens per prompt."})
    max_new_tokens: int = field(default=256, metadata={"help": "Tokens generated per prompt."})
    temperatures: list[float] = field(
        default_factory=lambda: [0.0, 0.7], metadata={"help": "Decodings to evaluate; 0 is greedy."}
    )
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": "Methods to evaluate."})
    eval_dtype: Literal["float32", "bfloat16"] = field(
        default="float32",
        metadata={"help": "Dtype of the models at evaluation; float32 makes greedy outputs comparable exactly."},
    )
    tree_widths: list[int] = field(
        default_factory=lambda: [4, 16, 16, 16, 16], metadata={"help": "Engine tree widths per level."}
    )
    prompt_lookup_tokens: int = field(default=10, metadata={"help": "`prompt_lookup_num_tokens`."})
    eval_workers: int = field(
        default=14,
        metadata={"help": "Processes sharing the GPU for tau and exactness (0: one process, every call timed)."},
    )
    eval_batch_size: int = field(
        default=16,
        metadata={
            "help": "Prompts per call of the engine and of sampled vanilla in the tau pass (left-padded batches; "
            "1: every call at batch 1). Speed is always timed at batch 1."
        },
    )
    timing_prompts: int = field(
        default=3,
        metadata={
            "help": "With workers or batches: prompts timed alone per method, at batch 1 (the first always, the "
            "others while the deadline allows: one sampled continuation is a noisy timing)."
        },
    )
    timing_seconds: float = field(
        default=30.0, metadata={"help": "With workers or batches: time kept for the timing pass."}
    )

    def check(self) -> None:
        """Raise `ValueError` naming the flags that contradict each other."""
        if self.target_hidden_size % self.target_heads or self.target_heads % self.target_kv_heads:
            raise ValueError("`target_hidden_size` must divide by `target_heads`, and that by `target_kv_heads`.")
        if self.max_draft_lag < self.num_draft_tokens:
            raise ValueError("`max_draft_lag` must be at least `num_draft_tokens` (the deepest chain step's lag).")
        if self.distill_min_prompt_tokens > self.distill_max_prompt_tokens:
            raise ValueError("`distill_min_prompt_tokens` must not exceed `distill_max_prompt_tokens`.")
        if self.eval_batch_size < 1:
            raise ValueError(f"`eval_batch_size` must be at least 1, got {self.eval_batch_size}.")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"Unknown `methods` {unknown}; choose from {list(METHODS)}.")


# Values of `--tiny` (CPU, seconds): each replaces a setting left at its default.
TINY = dict(
    corpus="stdlib",
    heldout_packages=["json"],
    min_heldout_bytes=10_000,
    max_heldout_bytes=100_000,
    corpus_bytes=400_000,
    max_files=40,
    vocab_size=300,
    tokenizer_train_bytes=400_000,
    target_layers=2,
    target_hidden_size=64,
    target_intermediate_size=128,
    target_heads=4,
    target_kv_heads=2,
    seq_len=64,
    target_batch_size=8,
    target_lr=3e-3,
    target_warmup_steps=5,
    target_seconds=20.0,
    target_max_steps=60,
    log_every=10,
    heldout_eval_rows=4,
    distill_seconds=10.0,
    distill_max_batches=2,
    distill_batch_size=8,
    distill_min_prompt_tokens=8,
    distill_max_prompt_tokens=24,
    distill_new_tokens=24,
    draft_corpus_tokens=20_000,
    sliding_window=16,
    draft_batch_size=4,
    draft_lr=3e-3,
    draft_warmup_steps=2,
    draft_seconds=10.0,
    draft_max_steps=8,
    draft_eval_fraction=0.2,
    draft_logging_steps=2,
    num_prompts=3,
    prompt_tokens=24,
    max_new_tokens=16,
    eval_workers=0,
    deadline_seconds=600.0,
)


def parse_args(argv: list[str] | None) -> SelfTrainedArguments:
    parser = HfArgumentParser(SelfTrainedArguments, description=__doc__.split("\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    if args.tiny:
        defaults = SelfTrainedArguments()
        for name, value in TINY.items():
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
    try:
        args.check()
    except ValueError as error:
        parser.error(str(error))
    return args


# --- bookkeeping ---------------------------------------------------------------------------------------------------


class Report:
    """Phase timings and results, printed as they come and rewritten to `results.json` after each phase."""

    def __init__(self, out: Path, start: float) -> None:
        self.out, self.start = out, start
        self.data: dict = {"phases": {}}
        self.log_lines: list[str] = []

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f} s] {text}"
        print(line, flush=True)
        self.log_lines.append(line)

    @contextmanager
    def phase(self, name: str, estimate: str) -> Iterator[None]:
        self.say(f"== {name} (expected {estimate})")
        began = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - began
            self.data["phases"][name] = round(seconds, 2)
            self.say(f"== {name}: {seconds:.1f} s")
            self.save()

    def save(self) -> None:
        self.data["elapsed_seconds"] = round(time.monotonic() - self.start, 2)
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "run.log").write_text("\n".join(self.log_lines) + "\n")


def preflight() -> None:
    """Import what later phases need (the GLIDE data pipeline's `datasets`), so that a missing or broken package
    fails the run in its first seconds rather than after the target's training."""
    for module in ("datasets", "tokenizers"):
        importlib.import_module(module)


def environment(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    for package in ("tokenizers", "datasets", "liger-kernel", "accelerate"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if device.type == "cuda":
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.glob("*.safetensors"))


# --- 1. corpus -----------------------------------------------------------------------------------------------------


@dataclass
class SourceFile:
    path: str
    package: str
    size: int


def corpus_roots(kind: str) -> list[Path]:
    """The standard library first, then (for `all`) every site-packages folder of this interpreter."""
    roots = [Path(sysconfig.get_paths()["stdlib"]).resolve()]
    if kind == "all":
        paths = sysconfig.get_paths()
        for candidate in [*site.getsitepackages(), paths["purelib"], paths["platlib"]]:
            resolved = Path(candidate).resolve()
            if resolved.is_dir() and resolved not in roots:
                roots.append(resolved)
    return roots


def list_sources(roots: list[Path], max_file_bytes: int) -> list[SourceFile]:
    """Every `.py` file under `roots` in a fixed order (roots in order, then sorted paths); a file's package is the
    first component of its path below its root."""
    files = []
    for root_index, root in enumerate(roots):
        for directory, dirnames, filenames in os.walk(root):
            skipped = STDLIB_SKIPPED_DIRS if root_index == 0 else {"__pycache__"}
            dirnames[:] = sorted(name for name in dirnames if name not in skipped)
            relative = Path(directory).relative_to(root)
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                package = relative.parts[0] if relative.parts else name.removesuffix(".py")
                if package in SKIPPED_PACKAGES:
                    continue
                path = os.path.join(directory, name)
                try:
                    size = os.stat(path).st_size
                except OSError:
                    continue
                if 0 < size <= max_file_bytes:
                    files.append(SourceFile(path, package, size))
    return files


def choose_heldout(files: list[SourceFile], requested: list[str], min_bytes: int) -> tuple[list[str], str]:
    """The held-out packages: the requested ones present, completed (if under `min_bytes`) by the largest packages
    that are each at most `FALLBACK_HELDOUT_MAX_FRACTION` of the corpus. Returns them and why."""
    sizes = Counter()
    for file in files:
        sizes[file.package] += file.size
    chosen = [package for package in requested if sizes[package] > 0]
    if sum(sizes[p] for p in chosen) >= min_bytes:
        return chosen, f"requested packages present: {chosen}"
    limit = FALLBACK_HELDOUT_MAX_FRACTION * sum(sizes.values())
    for package, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        if sum(sizes[p] for p in chosen) >= min_bytes:
            break
        if package not in chosen and size <= limit:
            chosen.append(package)
    missing = [package for package in requested if package not in chosen]
    return chosen, f"requested {requested}, missing or too small {missing}; completed by size: {chosen}"


def read_texts(files: list[SourceFile], max_bytes: int, max_files: int | None, skip_hashes: set) -> list[str]:
    """UTF-8 texts of `files` in order, until `max_bytes` or `max_files`; files that do not decode, and exact
    duplicates (of each other or of `skip_hashes`, which this extends), are skipped."""
    texts, total = [], 0
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(files), READ_BATCH_FILES):
            for raw in pool.map(_read_bytes, files[start : start + READ_BATCH_FILES]):
                if raw is None:
                    continue
                digest = hashlib.blake2b(raw, digest_size=16).digest()
                if digest in skip_hashes:
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                skip_hashes.add(digest)
                texts.append(text)
                total += len(raw)
                if total >= max_bytes or (max_files is not None and len(texts) >= max_files):
                    return texts
    return texts


def _read_bytes(file: SourceFile) -> bytes | None:
    try:
        with open(file.path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def build_corpus(args: SelfTrainedArguments, report: Report) -> tuple[list[str], list[str]]:
    roots = corpus_roots(args.corpus)
    files = list_sources(roots, args.max_file_bytes)
    heldout_packages, reason = choose_heldout(files, args.heldout_packages, args.min_heldout_bytes)
    heldout_set = set(heldout_packages)
    heldout_files = [file for file in files if file.package in heldout_set]
    train_files = [file for file in files if file.package not in heldout_set]
    rng = random.Random(args.seed)
    rng.shuffle(heldout_files)
    rng.shuffle(train_files)
    seen: set = set()
    heldout_texts = read_texts(heldout_files, args.max_heldout_bytes, None, seen)
    # `seen` now holds the held-out contents: a training file identical to one of them is skipped.
    train_texts = read_texts(train_files, args.corpus_bytes, args.max_files, seen)
    train_bytes = sum(len(text.encode()) for text in train_texts)
    heldout_bytes = sum(len(text.encode()) for text in heldout_texts)
    report.data["corpus"] = {
        "roots": [str(root) for root in roots],
        "files_listed": len(files),
        "heldout_packages": heldout_packages,
        "heldout_choice": reason,
        "heldout_files": len(heldout_texts),
        "heldout_bytes": heldout_bytes,
        "train_files": len(train_texts),
        "train_bytes": train_bytes,
        "train_packages": len({file.package for file in train_files}),
    }
    report.say(
        f"corpus: {len(train_texts)} training files ({train_bytes / 1e6:.1f} MB) from {len(roots)} roots; held out "
        f"{heldout_packages}: {len(heldout_texts)} files ({heldout_bytes / 1e6:.1f} MB)"
    )
    if not train_texts or not heldout_texts:
        raise ValueError("The corpus or the held-out set is empty: check `corpus`, `heldout_packages`.")
    return train_texts, heldout_texts


# --- 2. tokenizer --------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, max_bytes: int) -> PreTrainedTokenizerFast:
    """The demo's byte-level BPE (every byte is a token, so any text round-trips) learned from the first
    `max_bytes` of `texts`."""
    sample, total = [], 0
    for text in texts:
        sample.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return demo.train_tokenizer(sample, vocab_size)


def encode_files(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (no special tokens), in chunks so that only one chunk's encodings exist at once."""
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # `_fast` skips offsets (tokenizers 0.20+)
    arrays = []
    for start in range(0, len(texts), ENCODE_CHUNK_FILES):
        for encoding in encode(texts[start : start + ENCODE_CHUNK_FILES], add_special_tokens=False):
            arrays.append(np.asarray(encoding.ids, dtype=np.int32))
    return arrays


def join_stream(arrays: list[np.ndarray], eos_id: int) -> torch.Tensor:
    """One int32 stream: each file followed by the end-of-text token."""
    eos = np.array([eos_id], dtype=np.int32)
    return torch.from_numpy(np.concatenate([part for array in arrays for part in (array, eos)]))


# --- 3. target -----------------------------------------------------------------------------------------------------


def build_target(args: SelfTrainedArguments, vocab_size: int, eos_id: int):
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=args.target_hidden_size,
        intermediate_size=args.target_intermediate_size,
        num_hidden_layers=args.target_layers,
        num_attention_heads=args.target_heads,
        num_key_value_heads=args.target_kv_heads,
        max_position_embeddings=max(args.seq_len, args.prompt_tokens + args.max_new_tokens + 16),
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )
    if args.arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**fields))
    return LlamaForCausalLM(LlamaConfig(**fields))


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_target(model, stream: torch.Tensor, args: SelfTrainedArguments, device: torch.device) -> dict:
    """Plain loop: shuffled rows of `seq_len` tokens, AdamW, warm-up and cosine, bf16 autocast on CUDA."""
    num_rows = stream.numel() // args.seq_len
    rows = stream[: num_rows * args.seq_len].view(num_rows, args.seq_len).to(device)  # int32 on the device
    batch_size = min(args.target_batch_size, num_rows)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": args.target_weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=args.target_lr,
        betas=ADAM_BETAS,
        fused=device.type == "cuda",
    )
    budget = TrainingBudget(args.target_max_steps, args.target_seconds, args.target_warmup_steps, args.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, budget.lr_factor)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    order, cursor, epochs = torch.randperm(num_rows, device=device, generator=generator), 0, 0
    losses, running, step = [], torch.zeros((), device=device), 0
    model.train()
    budget.start()
    while not budget.exhausted(step):
        if cursor + batch_size > num_rows:
            order, cursor, epochs = torch.randperm(num_rows, device=device, generator=generator), 0, epochs + 1
        batch = rows[order[cursor : cursor + batch_size]].long()
        cursor += batch_size
        with autocast(device):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()
        step += 1
        if step % args.log_every == 0:  # the one host synchronisation, every `log_every` steps
            losses.append((step, round((running / args.log_every).item(), 4)))
            running.zero_()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.eval()
    seconds = budget.elapsed()
    tokens = step * batch_size * args.seq_len
    return {
        "steps": step,
        "seconds": round(seconds, 1),
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / max(seconds, 1e-9)),
        "epochs": round(tokens / max(num_rows * args.seq_len, 1), 2),
        "train_loss_final": losses[-1][1] if losses else None,
        "loss_curve": losses,
    }


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, args: SelfTrainedArguments, device: torch.device) -> float:
    """Mean next-token loss of `model` on the first `heldout_eval_rows` rows of the held-out stream."""
    num_rows = min(args.heldout_eval_rows, stream.numel() // args.seq_len)
    rows = stream[: num_rows * args.seq_len].view(num_rows, args.seq_len).long().to(device)
    losses = []
    for batch in rows.split(max(1, args.target_batch_size // 2)):
        with autocast(device):
            losses.append(model(input_ids=batch, labels=batch).loss.float())
    return round(torch.stack(losses).mean().item(), 4)


# --- 4. draft data -------------------------------------------------------------------------------------------------


@torch.no_grad()
def distill_records(target_dir: Path, tokenizer, stream: torch.Tensor, args, device, report: Report) -> list[dict]:
    """The target's continuations of random training windows, one prompt length per batch (no padding): in every
    batch a `distill_sample_fraction` share of the rows is sampled at `distill_temperature` and the rest is greedy,
    so even a budget of one batch yields both kinds; batches run until `distill_seconds` or `distill_max_batches`."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).to(device).eval()
    eos = tokenizer.eos_token_id
    rng = torch.Generator().manual_seed(args.seed + 1)
    records, batches, rows, ended, generated = [], 0, {"greedy": 0, "sampled": 0}, 0, 0
    sampled_per_batch = round(args.distill_batch_size * args.distill_sample_fraction)
    split = {"sampled": sampled_per_batch, "greedy": args.distill_batch_size - sampled_per_batch}
    start, last_batch = time.monotonic(), 0.0
    while batches < args.distill_max_batches:
        elapsed = time.monotonic() - start
        if batches > 0 and elapsed + last_batch > args.distill_seconds:
            break
        length = int(
            torch.randint(args.distill_min_prompt_tokens, args.distill_max_prompt_tokens + 1, (), generator=rng)
        )
        starts = torch.randint(0, stream.numel() - length, (args.distill_batch_size,), generator=rng)
        all_prompts = stream[starts[:, None] + torch.arange(length)].long().to(device)  # [B, L]
        torch.manual_seed(args.seed + batches)
        for kind, prompts in zip(split, all_prompts.split(list(split.values()))):
            if prompts.shape[0] == 0:
                continue
            sampling = {"temperature": args.distill_temperature} if kind == "sampled" else {}
            output = model.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=args.distill_new_tokens,
                eos_token_id=eos,
                pad_token_id=eos,
                do_sample=kind == "sampled",
                **sampling,
            )
            cut = []
            for tokens in output[:, length:].cpu().tolist():
                if eos in tokens:
                    tokens = tokens[: tokens.index(eos)]
                    ended += 1
                cut.append(tokens)
                generated += len(tokens)
            sources = tokenizer.batch_decode(prompts.cpu().tolist())
            targets = tokenizer.batch_decode(cut)
            records.extend({"source": s, "target": t} for s, t in zip(sources, targets) if t)
            rows[kind] += len(cut)
        batches += 1
        last_batch = time.monotonic() - start - elapsed
    seconds = time.monotonic() - start
    report.data["draft_data"] = {
        "kind": "distill",
        "batches": batches,
        "records": len(records),
        "greedy_rows": rows["greedy"],
        "sampled_rows": rows["sampled"],
        "rows_ended_by_eos": ended,
        "generated_tokens": generated,
        "seconds": round(seconds, 1),
        "generated_tokens_per_second": round(generated / max(seconds, 1e-9)),
    }
    del model
    _free(device)
    return records


def corpus_records(tokenizer, stream: torch.Tensor, args) -> list[dict]:
    """Random windows of the training stream, `seq_len` tokens each, up to `draft_corpus_tokens`."""
    rng = torch.Generator().manual_seed(args.seed + 2)
    count = max(1, args.draft_corpus_tokens // args.seq_len)
    starts = torch.randint(0, stream.numel() - args.seq_len, (count,), generator=rng)
    windows = stream[starts[:, None] + torch.arange(args.seq_len)].tolist()
    return [{"text": text} for text in tokenizer.batch_decode(windows)]


# --- 5. and 6. drafts ----------------------------------------------------------------------------------------------


def draft_training_arguments(args: SelfTrainedArguments, output_dir: Path, device: torch.device) -> TrainingArguments:
    cuda = device.type == "cuda"
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.draft_batch_size,
        per_device_eval_batch_size=args.draft_batch_size,
        learning_rate=args.draft_lr,
        weight_decay=DRAFT_WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        max_steps=args.draft_max_steps,
        logging_steps=args.draft_logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        bf16=cuda,
        use_cpu=not cuda,
        seed=args.seed,
        dataloader_num_workers=2 if cuda else 0,
        dataloader_persistent_workers=cuda,
        disable_tqdm=True,
    )


def install_budget(trainer: Trainer, args: SelfTrainedArguments, device: torch.device) -> TrainingBudget:
    """AdamW over the trainable parameters with the time-budget schedule, and the callback that stops training."""
    budget = TrainingBudget(args.draft_max_steps, args.draft_seconds, args.draft_warmup_steps, args.min_lr_ratio)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.optimizer = torch.optim.AdamW(
        trainable, lr=args.draft_lr, weight_decay=DRAFT_WEIGHT_DECAY, betas=ADAM_BETAS, fused=device.type == "cuda"
    )
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, budget.lr_factor)
    trainer.add_callback(BudgetCallback(budget))
    return budget


def training_summary(trainer: Trainer, budget: TrainingBudget, args: SelfTrainedArguments) -> dict:
    curve = [(entry["step"], round(entry["loss"], 4)) for entry in trainer.state.log_history if "loss" in entry]
    steps = trainer.state.global_step
    eval_loss = trainer.evaluate()["eval_loss"] if trainer.eval_dataset is not None else None
    return {
        "steps": steps,
        "seconds": round(budget.elapsed(), 1),
        "rows_seen": steps * args.draft_batch_size,
        "tokens_seen": steps * args.draft_batch_size * args.seq_len,
        "epochs": round(steps * args.draft_batch_size / max(len(trainer.train_dataset), 1), 2),
        "train_loss_final": curve[-1][1] if curve else None,
        "eval_loss": round(eval_loss, 4) if eval_loss is not None else None,
        "loss_curve": curve,
    }


def independent_shape(glide_trainable: int, vocab_size: int, hidden_limit: int, tied: bool) -> tuple[int, int]:
    """(hidden, intermediate) of a one-layer Llama with `glide_trainable` parameters: hidden a multiple of
    `INDEPENDENT_HEAD_DIM` (full multi-head attention), the MLP width solving the count, and among those the shape
    whose MLP ratio is nearest Llama's 8/3."""
    best = None
    for hidden in range(INDEPENDENT_HEAD_DIM, hidden_limit + 1, INDEPENDENT_HEAD_DIM):
        # embedding (and head) + q,k,v,o + two layer norms and the final norm; the MLP takes the rest.
        fixed = vocab_size * hidden * (1 if tied else 2) + 4 * hidden * hidden + 3 * hidden
        intermediate = round((glide_trainable - fixed) / (3 * hidden) / 16) * 16
        if intermediate < 16:
            continue
        distance = abs(math.log(intermediate / hidden / TARGET_MLP_RATIO))
        if best is None or distance < best[0]:
            best = (distance, hidden, intermediate)
    if best is None:
        return INDEPENDENT_HEAD_DIM, 16
    return best[1], best[2]


def build_independent(glide_trainable: int, target_config, tied: bool) -> LlamaForCausalLM:
    hidden, intermediate = independent_shape(
        glide_trainable, target_config.vocab_size, target_config.hidden_size, tied
    )
    heads = hidden // INDEPENDENT_HEAD_DIM
    config = LlamaConfig(
        vocab_size=target_config.vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=target_config.max_position_embeddings,
        bos_token_id=target_config.bos_token_id,
        eos_token_id=target_config.eos_token_id,
        pad_token_id=target_config.pad_token_id,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- 7. evaluation -------------------------------------------------------------------------------------------------


def select_prompts(heldout_arrays: list[np.ndarray], count: int, length: int, seed: int) -> list[list[int]]:
    """`count` windows of `length` tokens from held-out files, one per file while files last (files in a seeded
    order, a seeded start in each), then again over the files."""
    rng = random.Random(seed)
    usable = [array for array in heldout_arrays if len(array) > length]
    if not usable:
        raise ValueError(f"No held-out file has more than `prompt_tokens`={length} tokens.")
    rng.shuffle(usable)
    prompts = []
    while len(prompts) < count:
        array = usable[len(prompts) % len(usable)]
        start = rng.randrange(0, len(array) - length)
        prompts.append(array[start : start + length].tolist())
    return prompts


def goal_lines(result) -> list[str]:
    """The issue's goals, checked on this run's figures."""
    lines = []
    for temperature in result.settings.temperatures:
        glide = result.summary("glide_assisted", temperature)
        independent = result.summary("independent_assisted", temperature)
        lookup = result.summary("prompt_lookup", temperature)
        name = "greedy" if temperature == 0 else f"T={temperature:g}"
        if glide and independent and glide.tau and independent.tau:
            ratio = glide.tau / independent.tau
            verdict = "met" if ratio >= 1.2 else f"missed by {1.2 - ratio:.2f}"
            lines.append(f"- {name}: tau GLIDE / independent draft = {ratio:.2f} (goal >= 1.2: {verdict})")
        if glide and lookup and glide.tau and lookup.tau:
            verdict = "met" if glide.tau > lookup.tau else "missed"
            lines.append(
                f"- {name}: tau GLIDE {glide.tau:.2f} vs prompt lookup {lookup.tau:.2f} (goal: above: {verdict})"
            )
        engines = [result.summary(m, temperature) for m in ENGINE_STRATEGIES]
        engines = [s for s in engines if s is not None and s.speedup is not None]
        if engines:
            best = max(engines, key=lambda s: s.speedup)
            verdict = "met" if best.speedup >= 2.5 else f"missed by {2.5 - best.speedup:.2f}x"
            lines.append(
                f"- {name}: best engine speedup {best.speedup:.2f}x ({best.method}) (goal >= 2.5x: {verdict})"
            )
    return lines


# --- main ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run every phase; return 0 when every method ran and greedy outputs agreed, else 1."""
    start = time.monotonic()
    args = parse_args(argv)
    preflight()
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = Report(out, start)
    report.data.update(
        issue=5,
        command=sys.argv if argv is None else ["run.py", *argv],
        arguments=dataclasses.asdict(args),
        environment=environment(device),
    )
    torch.manual_seed(args.seed)
    report.say(
        f"device {report.data['environment']['device']}; budgets: target {args.target_seconds:.0f} s, distill "
        f"{args.distill_seconds:.0f} s, each draft {args.draft_seconds:.0f} s; evaluation until "
        f"{args.deadline_seconds:.0f} s"
    )

    with report.phase("corpus", "~10-20 s on the GPU machine"):
        train_texts, heldout_texts = build_corpus(args, report)
    with report.phase("tokenizer", "~10-20 s"):
        tokenizer = train_tokenizer(train_texts, args.vocab_size, args.tokenizer_train_bytes)
        report.data["tokenizer"] = {"vocab_size": len(tokenizer), "train_bytes_cap": args.tokenizer_train_bytes}
    with report.phase("tokenize", "~10-20 s"):
        eos = tokenizer.eos_token_id
        train_stream = join_stream(encode_files(tokenizer, train_texts), eos)
        heldout_arrays = encode_files(tokenizer, heldout_texts)
        heldout_stream = join_stream(heldout_arrays, eos)
        train_bytes = report.data["corpus"]["train_bytes"]
        report.data["tokenizer"].update(
            train_tokens=train_stream.numel(),
            heldout_tokens=heldout_stream.numel(),
            bytes_per_token=round(train_bytes / max(train_stream.numel(), 1), 3),
        )
        report.say(f"tokens: {train_stream.numel() / 1e6:.1f}M training, {heldout_stream.numel() / 1e6:.2f}M held out")
        del train_texts, heldout_texts

    target_dir = work / "target"
    with report.phase("target", f"~{args.target_seconds + 10:.0f} s"):
        torch.manual_seed(args.seed)
        target = build_target(args, len(tokenizer), eos).to(device)
        log = train_target(target, train_stream, args, device)
        log["heldout_loss"] = heldout_loss(target, heldout_stream, args, device)
        log["parameters"] = target.num_parameters()
        target.save_pretrained(target_dir)
        tokenizer.save_pretrained(target_dir)
        log["weights_bytes"] = folder_bytes(target_dir)
        log["arch"] = args.arch
        report.data["target"] = log
        report.say(
            f"target: {log['parameters'] / 1e6:.1f}M parameters, {log['steps']} steps, "
            f"{log['tokens_seen'] / 1e6:.1f}M tokens ({log['epochs']} epochs), train loss "
            f"{log['train_loss_final']}, held-out loss {log['heldout_loss']}"
        )
        target_config = target.config
        del target
        _free(device)

    data_dir = work / "draft_data"
    data_dir.mkdir(exist_ok=True)
    data_file = data_dir / "train.jsonl"
    with report.phase("draft data", f"~{args.distill_seconds + 10:.0f} s"):
        if args.draft_data == "distill":
            records = distill_records(target_dir, tokenizer, train_stream, args, device, report)
            data_format = "source_target"
        else:
            records = corpus_records(tokenizer, train_stream, args)
            data_format = "text"
            report.data["draft_data"] = {"kind": "corpus", "records": len(records)}
        with open(data_file, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        report.say(f"draft data: {len(records)} {args.draft_data} records")
        del records

    glide_dir = work / "glide_draft"
    with report.phase("GLIDE draft", f"~{args.draft_seconds + 25:.0f} s (data pipeline, training, saving)"):
        glide_args = GlideTrainingArguments(
            target=str(target_dir),
            data=[str(data_file)],
            data_format=data_format,
            max_length=args.seq_len,
            packing=True,
            eval_split_fraction=args.draft_eval_fraction,
            acceptance_eval_prompts=0,
            sliding_window=args.sliding_window,
            max_draft_lag=args.max_draft_lag,
            num_draft_tokens=args.num_draft_tokens,
            data_cache_dir=str(work / "datasets_cache"),
            attn_implementation="sdpa",
        )
        trainer = build_glide_trainer(glide_args, draft_training_arguments(args, glide_dir, device))
        budget = install_budget(trainer, args, device)
        trainer.train()
        glide_log = training_summary(trainer, budget, args)
        draft = trainer.model
        glide_trainable = sum(p.numel() for p in draft.parameters() if p.requires_grad)
        trainer.save_model(str(glide_dir))
        glide_log.update(
            trainable_parameters=glide_trainable,
            weights_bytes=folder_bytes(glide_dir),
            loss_implementation=resolve_loss_implementation(draft.config.loss_implementation, device),
            sliding_window=args.sliding_window,
            max_draft_lag=args.max_draft_lag,
        )
        report.data["glide_draft"] = glide_log
        report.say(
            f"GLIDE draft: {glide_trainable / 1e6:.2f}M trainable parameters, {glide_log['steps']} steps "
            f"({glide_log['epochs']} epochs), train loss {glide_log['train_loss_final']}, held-out loss "
            f"{glide_log['eval_loss']} ({glide_log['loss_implementation']} loss)"
        )
        train_dataset, eval_dataset, collator = trainer.train_dataset, trainer.eval_dataset, trainer.data_collator
        del trainer, draft
        _free(device)

    independent_dir = work / "independent_draft"
    with report.phase("independent draft", f"~{args.draft_seconds + 10:.0f} s"):
        torch.manual_seed(args.seed)
        independent = build_independent(glide_trainable, target_config, args.independent_tied_embeddings)
        trainer = Trainer(
            model=independent,
            args=draft_training_arguments(args, independent_dir, device),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collator,
        )
        budget = install_budget(trainer, args, device)
        trainer.train()
        independent_log = training_summary(trainer, budget, args)
        trainer.save_model(str(independent_dir))
        independent_log.update(
            parameters=independent.num_parameters(),
            hidden_size=independent.config.hidden_size,
            intermediate_size=independent.config.intermediate_size,
            tied_embeddings=args.independent_tied_embeddings,
            weights_bytes=folder_bytes(independent_dir),
        )
        report.data["independent_draft"] = independent_log
        report.say(
            f"independent draft: {independent_log['parameters'] / 1e6:.2f}M parameters (GLIDE trainable "
            f"{glide_trainable / 1e6:.2f}M), {independent_log['steps']} steps ({independent_log['epochs']} epochs), "
            f"train loss {independent_log['train_loss_final']}, held-out loss {independent_log['eval_loss']}"
        )
        del trainer, independent, train_dataset, eval_dataset
        _free(device)

    with report.phase("evaluation", f"until {args.deadline_seconds:.0f} s"):
        prompts = select_prompts(heldout_arrays, args.num_prompts, args.prompt_tokens, args.seed)
        spec = ModelSpec(
            target=str(target_dir),
            draft=str(glide_dir),
            assistant=str(independent_dir),
            dtype=args.eval_dtype,
            device=str(device),
        )
        settings = DecodingSettings(
            max_new_tokens=args.max_new_tokens,
            temperatures=tuple(args.temperatures),
            num_draft_tokens=args.num_draft_tokens,
            tree_widths=tuple(args.tree_widths),
            prompt_lookup_tokens=args.prompt_lookup_tokens,
            seed=args.seed,
        )
        # Leave two cores to this process and the system: the workers are CPU-bound (eager decoding overhead).
        workers = min(args.eval_workers, max(1, (os.cpu_count() or 2) - 2)) if args.eval_workers > 0 else 0
        report.say(
            f"evaluation: {len(prompts)} prompts, {workers} worker processes, batches of {args.eval_batch_size}"
        )
        result = evaluate(
            spec,
            prompts,
            args.methods,
            settings,
            workers=workers,
            timing_prompts=args.timing_prompts,
            deadline=start + args.deadline_seconds,
            timing_seconds=args.timing_seconds,
            batch_size=args.eval_batch_size,
        )
        report.data["evaluation"] = result.to_dict()
        if result.prompt_indices:  # a sample: the first complete prompt and vanilla's continuations
            first = result.prompt_indices[0]
            report.data["evaluation"]["sample_prompt"] = tokenizer.decode(prompts[first])
            report.data["evaluation"]["sample_continuations"] = {
                f"vanilla T={record.temperature:g}": tokenizer.decode(record.tokens)
                for record in result.records
                if record.prompt_index == first and record.method == "vanilla"
            }

    table = format_table(result.summaries)
    goals = goal_lines(result)
    report.data["goals"] = goals
    environment_info = report.data["environment"]
    title = (
        f"self-trained {args.arch} target ({report.data['target']['parameters'] / 1e6:.1f}M parameters), "
        f"{environment_info['device']}, eval {args.eval_dtype}"
    )
    plotted = plot_summaries(result.summaries, str(out / "results.png"), title=title)
    header = [
        f"# Self-trained GLIDE benchmark: {title}",
        "",
        f"torch {environment_info['torch']}, transformers {environment_info['transformers']}, seed {args.seed}; "
        f"phases (s): {json.dumps(report.data['phases'])}",
        "",
    ]
    details = [
        format_notes(result),
        *goals,
        f"- target: held-out loss {report.data['target']['heldout_loss']}, train loss "
        f"{report.data['target']['train_loss_final']}; GLIDE draft {glide_trainable} trainable parameters, "
        f"independent draft {report.data['independent_draft']['parameters']} parameters; weights (bytes): target "
        f"{report.data['target']['weights_bytes']}, GLIDE {report.data['glide_draft']['weights_bytes']}, "
        f"independent {report.data['independent_draft']['weights_bytes']}.",
    ]
    (out / "results.md").write_text("\n".join([*header, table, "", *details]) + "\n")
    report.data["plot"] = "results.png" if plotted else None
    report.save()
    print()
    print("\n".join([*header, *details, "", table]))
    greedy_ok = not result.mismatches
    return 0 if greedy_ok and not result.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
