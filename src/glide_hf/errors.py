"""Typed errors of glide_hf.

Each error also inherits the built-in exception it stands for, so `except ValueError` keeps working for callers
that do not know this package. This file has no dependencies: it belongs to the set of files that
`trust_remote_code` copies next to a saved draft.
"""


class GlideError(Exception):
    """Base class of every error raised by glide_hf."""


class GlideConfigError(GlideError, ValueError):
    """A `GlideConfig` field has an invalid value or the fields contradict each other."""


class TargetMismatchError(GlideError, ValueError):
    """The target model attached to a draft does not have the shape the draft was built for."""


class UnsupportedTargetError(GlideError, ValueError):
    """The model given as target is not a decoder-only model with a rotary KV cache."""


class TargetNotAttachedError(GlideError, RuntimeError):
    """The draft was used before a frozen target model was attached to it."""


class TargetNotFoundError(GlideError, OSError):
    """The target named in a draft's config could not be loaded."""


class CacheStateError(GlideError, RuntimeError):
    """A cache handed to the draft does not describe the tokens it is asked to process."""


class UnsupportedGenerationError(GlideError, ValueError):
    """A generation mode or argument that this path of glide_hf does not support."""


class DataNotFoundError(GlideError, FileNotFoundError):
    """A training data path does not exist or holds nothing that glide_hf can read."""


class DataFormatError(GlideError, ValueError):
    """A training data file or record cannot be read in the data format given or detected for it."""


class EmptyDatasetError(GlideError, ValueError):
    """No training sample is left after loading, filtering or splitting the data."""


class ChatTemplateError(GlideError, ValueError):
    """Chat data was given with a tokenizer that has no chat template."""


class CheckpointFormatError(GlideError, ValueError):
    """A checkpoint to load or convert is not in the expected format (file type, tensor names, dtypes)."""


class PeftConfigError(GlideError, ValueError):
    """A PEFT (LoRA) setting for a GLIDE draft that would reach the frozen target or names no draft module."""


class ResumeMismatchError(GlideError, ValueError):
    """An output file to resume holds records that do not answer the prompts of the input data in order."""


class ModelCardError(GlideError, ValueError):
    """A results or training file given to the model card generator cannot be read or holds nothing usable."""


__all__ = [
    "CacheStateError",
    "ChatTemplateError",
    "CheckpointFormatError",
    "DataFormatError",
    "DataNotFoundError",
    "EmptyDatasetError",
    "GlideConfigError",
    "GlideError",
    "ModelCardError",
    "PeftConfigError",
    "ResumeMismatchError",
    "TargetMismatchError",
    "TargetNotAttachedError",
    "TargetNotFoundError",
    "UnsupportedGenerationError",
    "UnsupportedTargetError",
]
