"""AI2's OLMo-7B-Instruct (SPEC section 8): the Kwanzaa backend's model.

Everything but the architecture check is the generic causal LM: the base model, its quantization
and the prompt format come from the `models/ai2.yaml` profile that training used.
"""

from __future__ import annotations

from kwanzaa_adapter.backend.models.causal_lm import CausalLMModel

OLMO_7B_INSTRUCT = "allenai/OLMo-7B-Instruct-hf"


class AI2Model(CausalLMModel):
    """OLMo base (4-bit where configured) + verified Kwanzaa adapter -> contract answers."""

    family = "ai2"
    model_types = frozenset({"olmo", "olmo2", "olmo3"})
