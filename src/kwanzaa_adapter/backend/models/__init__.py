"""Backend integration: the model factory and the models it builds (SPEC section 8)."""

from kwanzaa_adapter.backend.models.ai2 import AI2Model
from kwanzaa_adapter.backend.models.causal_lm import (
    AdapterInfo,
    AnswerResult,
    BaseModelMismatchError,
    CausalLMModel,
    ChatStream,
    ModelFamilyError,
    PromptTooLongError,
)
from kwanzaa_adapter.backend.models.factory import MODEL_REGISTRY, UnknownModelError, create_model, model_from_config

__all__ = [
    "MODEL_REGISTRY",
    "AI2Model",
    "AdapterInfo",
    "AnswerResult",
    "BaseModelMismatchError",
    "CausalLMModel",
    "ChatStream",
    "ModelFamilyError",
    "PromptTooLongError",
    "UnknownModelError",
    "create_model",
    "model_from_config",
]
