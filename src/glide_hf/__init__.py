"""glide-hf: GLIDE speculative decoding as a Hugging Face Transformers model.

Importing the package registers the `glide` model type with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`,
and registers the classes for auto classes, so that a saved draft carries its modeling code and loads with
`trust_remote_code=True` where glide_hf is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_glide import GlideConfig
from .errors import (
    CacheStateError,
    ChatTemplateError,
    CheckpointFormatError,
    DataFormatError,
    DataNotFoundError,
    EmptyDatasetError,
    GlideConfigError,
    GlideError,
    ModelCardError,
    PeftConfigError,
    ResumeMismatchError,
    TargetMismatchError,
    TargetNotAttachedError,
    TargetNotFoundError,
    UnsupportedGenerationError,
    UnsupportedTargetError,
)
from .modeling_glide import GlideForCausalLM, GlideModel, GlidePreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(GlideConfig.model_type, GlideConfig, exist_ok=True)
AutoModel.register(GlideConfig, GlideModel, exist_ok=True)
AutoModelForCausalLM.register(GlideConfig, GlideForCausalLM, exist_ok=True)
GlideConfig.register_for_auto_class("AutoConfig")
GlideModel.register_for_auto_class("AutoModel")
GlideForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "CacheStateError",
    "ChatTemplateError",
    "CheckpointFormatError",
    "DataFormatError",
    "DataNotFoundError",
    "EmptyDatasetError",
    "GlideConfig",
    "GlideConfigError",
    "GlideError",
    "GlideForCausalLM",
    "GlideModel",
    "GlidePreTrainedModel",
    "ModelCardError",
    "PeftConfigError",
    "ResumeMismatchError",
    "TargetMismatchError",
    "TargetNotAttachedError",
    "TargetNotFoundError",
    "UnsupportedGenerationError",
    "UnsupportedTargetError",
    "__version__",
]
