"""The model factory: a registry from `model.family` to the class that serves it (SPEC section 8)."""

from __future__ import annotations

from kwanzaa_adapter.backend.models.ai2 import AI2Model
from kwanzaa_adapter.backend.models.causal_lm import CausalLMModel
from kwanzaa_adapter.config import KwanzaaConfig
from kwanzaa_adapter.modeling.sources import ModelReferenceError

MODEL_REGISTRY: dict[str, type[CausalLMModel]] = {
    "ai2": AI2Model,
    "causal_lm": CausalLMModel,
}


class UnknownModelError(ModelReferenceError):
    """A model name the registry does not hold; the message lists the ones it does (exit 2)."""


def create_model(name: str, config: KwanzaaConfig, **options) -> CausalLMModel:
    """Build the registered model class `name` from a run config (the same files training reads).

    `options`: adapter (artifact directory), allow_base_mismatch, device.
    """
    try:
        model_class = MODEL_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_REGISTRY))
        raise UnknownModelError(f"model.family: unknown model '{name}'; registered models: {known}") from None
    return model_class(config, **options)


def model_from_config(config: KwanzaaConfig, **options) -> CausalLMModel:
    """The model class the config's `model.family` names."""
    return create_model(config.model.family, config, **options)
