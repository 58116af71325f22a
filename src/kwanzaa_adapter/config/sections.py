"""Typed run configuration: one pydantic model per concern, and the digest of a resolved config.

Every section forbids unknown keys and is frozen; `KwanzaaConfig` is the whole resolved
configuration of one run (`loading` composes and validates it from YAML).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from kwanzaa_adapter.contract import DEFAULT_SYSTEM_PROMPT

SEMVER = re.compile(r"^\d+\.\d+\.\d+$")


class ConfigError(Exception):
    """Bad configuration: every problem found, each naming its key path and source."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    # NaN and infinity pass `gt=0`-style bounds (every comparison with NaN is false): refuse them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RunConfig(_Section):
    name: str = Field(default="kwanzaa-adapter", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Run name; the run directory is <output_dir>/<name>.")
    output_dir: str = Field(default="outputs", description="Parent directory of run directories.")
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seed for Python, NumPy and torch.")
    version: str = Field(default="0.1.0", description="Semantic version of the published artifact.")
    deterministic: bool = Field(default=True, description="Use deterministic algorithms where the device allows.")

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not SEMVER.match(value):
            raise ValueError("must be a semantic version MAJOR.MINOR.PATCH, e.g. 0.1.0")
        return value


class ArchitectureConfig(_Section):
    """Declared shape of the base model, used by the dry-run planner when its config is out of reach."""

    num_parameters: int = Field(gt=0, le=10**13, description="Total parameter count of the base model.")
    hidden_size: int = Field(gt=0, le=10**8, description="Model width.")
    intermediate_size: int = Field(gt=0, le=10**8, description="MLP width.")
    num_hidden_layers: int = Field(gt=0, le=10**8, description="Number of transformer blocks.")
    num_attention_heads: int = Field(gt=0, le=10**8, description="Attention heads.")
    num_key_value_heads: int = Field(gt=0, le=10**8, description="Key/value heads (GQA).")
    vocab_size: int = Field(gt=0, le=10**8, description="Embedding rows.")
    tie_word_embeddings: bool = Field(default=False, description="Whether lm_head shares the embedding.")


class ModelConfig(_Section):
    family: str = Field(default="causal_lm", description="Model-factory registry name (ai2, causal_lm).")
    name_or_path: str = Field(min_length=1, description="Hub id, local directory, .gguf file or packaged model name.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(default=False, description="Run model code from the hub; off unless needed.")
    precision: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Dtype of the unquantized weights, the 4-bit compute and autocast. auto: bf16 "
                                    "on GPUs that support it (else fp16); on the CPU bf16 only where a probe of the "
                                    "model's products shows it clearly faster than fp32, else fp32.")
    attn_implementation: Literal["sdpa", "eager"] = Field(default="sdpa", description="Attention kernel.")
    architecture: ArchitectureConfig | None = Field(default=None, description="Declared shape for planning.")


class QuantizationConfig(_Section):
    load_in_4bit: bool = Field(default=True, description="QLoRA: load the base in 4 bits (bitsandbytes).")
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(default=True, description="Quantize the quantization constants too.")
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        default="uint8", description="Container dtype of the packed 4-bit weights; FSDP and ZeRO-3 shard them "
                                     "only when it equals the resolved model.precision.")
    upcast_unquantized: bool = Field(
        default=True, description="k-bit preparation casts the unquantized weights (embeddings, norms) to fp32, "
                                  "as PEFT does; false keeps them in model.precision (bf16: about a third less "
                                  "activation memory, the residual stream stays bf16).")


class AdapterConfig(_Section):
    type: Literal["lora"] = Field(default="lora", description="Adapter kind.")
    r: int = Field(gt=0, le=4096, description="LoRA rank.")
    alpha: int = Field(gt=0, le=65536, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(min_length=1, description="Module names that get LoRA.")
    bias: Literal["none", "all", "lora_only"] = Field(default="none", description="Which biases train.")
    top_layers: int | None = Field(
        default=None, gt=0, le=100_000,
        description="LoRA on the last N decoder blocks only (PEFT layers_to_transform); null: every block. The "
                    "backward pass stops at the lowest adapted block, so fewer blocks train faster.")


class DataConfig(_Section):
    train_file: str = Field(description="Training JSONL (chat or RAG-record form).")
    eval_file: str = Field(description="Evaluation JSONL.")
    max_seq_length: int = Field(gt=0, le=1_048_576, description="Tokens per sample; longer samples are truncated and counted.")
    system_prompt: str = Field(default=DEFAULT_SYSTEM_PROMPT, min_length=1,
                               description="System prompt for rendered RAG records.")
    batching: Literal["packed", "length_grouped"] = Field(
        default="packed", description="Padding-free packing, or length-grouped padded batches.")


class PreferenceConfig(_Section):
    """training.preference: DPO on pairs mined from the supervised adapter's own errors (issue 16)."""

    enabled: bool = Field(default=False, description="Run the preference stage after supervised training.")
    mining_file: str | None = Field(
        default=None, description="Chat-form JSONL to mine on (one-answer lines with meta.documents and "
                                  "meta.expect_refusal); default data.train_file. Never the eval split.")
    mining_examples: int = Field(default=96, gt=0, le=10**6,
                                 description="One-answer lines drawn (seeded) from the mining file per round.")
    near_miss_file: str | None = Field(
        default=None, description="Chat-form refusals whose meta.near_miss_of names a mining-file line with the "
                                  "answering document swapped out, paired with that line's answer as rejected; "
                                  "null: no near-miss pairs.")
    rounds: int = Field(default=1, ge=1, le=10, description="Mine, then train, this many times.")
    beta: float = Field(default=0.1, gt=0, le=100.0, description="DPO temperature (strength of the reference).")
    sft_weight: float = Field(default=0.0, ge=0.0, le=100.0,
                              description="Weight of the chosen answer's NLL beside the DPO loss (RPO); 0 = plain DPO.")
    num_epochs: float = Field(default=1.0, gt=0, le=1000, description="Passes over the pairs per round.")
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0, description="Peak learning rate of the stage.")
    gradient_accumulation_steps: int = Field(default=4, gt=0, le=65536, description="Pairs per optimizer step.")
    max_pairs: int | None = Field(default=None, gt=0, le=10**6, description="Keep at most this many pairs per round.")


class TrainingConfig(_Section):
    num_epochs: float = Field(gt=0, le=10_000, description="Passes over the training data.")
    max_steps: int = Field(default=-1, ge=-1, le=10**9, description="Optimizer steps; -1 derives them from num_epochs.")
    per_device_batch_size: int = Field(gt=0, le=65536, description="Samples per device per micro-batch.")
    gradient_accumulation_steps: int = Field(gt=0, le=65536, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(gt=0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Schedule after warmup.")
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0, description="Share of steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0.0, le=10.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch"] = Field(
        default="paged_adamw_8bit", description="Optimizer; 8-bit/paged fall back to adamw_torch off CUDA.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        default=True, description="Recompute activations to save memory; auto: on when the run's memory "
                                  "estimate without it exceeds half of the device's free memory.")
    logging_steps: int = Field(default=10, gt=0, le=10**9, description="Optimizer steps between log lines.")
    release_host_memory: bool = Field(
        default=False, description="Return the heap's free pages to the OS after every optimizer step (glibc "
                                   "malloc_trim): CPU training's resident memory stops growing step after step.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where to train.")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig,
                                         description="Preference stage after supervised training (DPO).")


class EvaluationConfig(_Section):
    eval_steps: int = Field(gt=0, le=10**9, description="Optimizer steps between eval-loss passes.")
    early_stopping_patience: int | None = Field(default=None, gt=0, le=10**6,
                                                description="Evals without improvement before stopping.")
    early_stopping_threshold: float = Field(default=0.0, ge=0.0, description="Minimum eval-loss improvement.")
    behavioral: bool = Field(default=True, description="Generate on the eval split and score the contract.")
    max_new_tokens: int = Field(default=256, gt=0, le=65536, description="Generation limit per answer.")
    batch_size: int = Field(default=8, gt=0, le=65536, description="Prompts per generation batch.")
    max_examples: int | None = Field(default=None, gt=0, le=10**9, description="Evaluate only the first N examples.")
    constrained_decoding: bool = Field(
        default=False, description="Hold every answer that `eval` and training's behavioural evaluation generate "
                                   "to the contract's JSON Schema (llguidance); off, they measure the adapter itself. "
                                   "`generate` and `/v1/answer` decode under the schema unless told not to "
                                   "(`--no-constrained`, \"constrained\": false), whatever this says.")


class InferenceConfig(_Section):
    """Which engine generates answers: evaluation, `generate`, `chat`, `serve`."""

    engine: Literal["auto", "reference", "llama.cpp"] = Field(
        default="auto", description="llama.cpp: a GGUF derived from the verified model (de-quantized base + LoRA "
                                    "delta); reference: the 4-bit base + adapter through Transformers; auto: "
                                    "llama.cpp where it is built and converts the model, else the reference.")
    quant: Literal["auto", "q8_0", "bf16", "f16"] = Field(
        default="auto", description="The derived GGUF's weight type; auto: bf16 where the CPU has AVX512-BF16 or "
                                    "AMX, else f16 (closer to the model as trained than q8_0).")
    threads: int | None = Field(default=None, gt=0, le=1024, description="llama.cpp threads (default: the cores, at most 8).")
    cache_dir: str | None = Field(default=None, description="Where derived models are kept (default "
                                                            "$KWANZAA_ADAPTER_CACHE or ~/.cache/kwanzaa-adapter).")


class GateConfig(_Section):
    """The answerability gate: fitted in step 5 on `decision_file`, applied wherever the adapter answers."""

    fit: bool = Field(default=False, description="Fit the gate after supervised training (needs decision_file).")
    decision_file: str | None = Field(
        default=None, description="RAG records labelled answer/refuse, derived from training documents only; "
                                  "ids '<group>.gate.<kind>.<n>' group the cross-fitting folds.")
    exclude_files: list[str] = Field(
        default_factory=list, description="Eval sets besides data.eval_file whose prompts no decision example may hold.")
    layers: list[int] | Literal["auto"] = Field(
        default="auto", description="Candidate blocks (1-based) whose output may feed the gate; auto: a third, "
                                    "half and two thirds of the depth.")
    regularization: list[float] = Field(
        default_factory=lambda: [0.01, 0.05, 0.25], min_length=1,
        description="Candidate inverse L2 strengths (logistic regression C).")
    folds: int = Field(default=5, ge=2, le=100, description="Cross-fitting folds, grouped by question.")
    refusal_prior: float = Field(
        default=0.33, gt=0.0, lt=1.0, description="Share of questions expected to need a refusal; weighs the "
                                                  "threshold's errors (the shipped training records: 91 of 277).")
    max_examples: int | None = Field(default=None, gt=0, le=10**7, description="Use at most this many examples.")
    batch_size: int = Field(default=8, gt=0, le=65536, description="Prompts per feature forward pass.")
    apply: bool = Field(default=True, description="Use the artifact's gate when answering; false: the "
                                                  "generation's own decision, for comparison.")

    @field_validator("regularization")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(c <= 0 for c in value):
            raise ValueError("every C must be > 0")
        return value

    @model_validator(mode="after")
    def _file_when_fitting(self) -> "GateConfig":
        if self.fit and not self.decision_file:
            raise ValueError("decision_file is required when fit is true")
        return self


class EvidenceConfig(_Section):
    """The evidence chosen on purpose and the grounding check, applied to the answers the adapter writes."""

    fit: bool = Field(default=False, description="Fit the evidence selector after supervised training, on the "
                                                 "gold answers of gate.decision_file's answerable examples, in "
                                                 "the gate's pass.")
    depth: int | Literal["auto"] = Field(
        default="auto", description="The selector reads the attention of blocks 1..depth; auto: the gate's "
                                    "deepest candidate block, where the shared pass stops.")
    apply: Literal["none", "cite", "hold"] = Field(
        default="none", description="With the artifact's selector: cite moves the answer's citations to the chosen "
                                   "sentence's document; hold writes the chosen sentence as the answer text; none "
                                   "leaves the model's answer.")
    grounding_check: bool = Field(
        default=False, description="After generation, drop answer sentences no document supports (to "
                                   "unknowns.unsupported_claims) and move citations to the documents that support "
                                   "their sentence.")


class CheckpointConfig(_Section):
    save_steps: int = Field(gt=0, le=10**9, description="Optimizer steps between checkpoints.")
    save_total_limit: int = Field(default=3, gt=0, le=10**6, description="Checkpoints kept on disk.")


class ArtifactConfig(_Section):
    license: str = Field(default="apache-2.0", description="License in the model card.")
    tags: list[str] = Field(default_factory=lambda: ["kwanzaa", "rag", "citations", "qlora"],
                            description="Model-card tags.")
    signing: str | None = Field(default=None, min_length=1,
                                description="Private key (EC PEM) that signs the artifact in step 7 (model.sig); "
                                            "null: unsigned.")
    trusted_keys: list[str] = Field(default_factory=list,
                                    description="Public keys (EC PEM) the backend accepts signatures of; "
                                                "empty: no signature required.")


class MlflowConfig(_Section):
    tracking_uri: str | None = Field(
        default=None, description="Tracking store or server URI; default sqlite:///<run dir>/mlflow.db.")
    experiment: str = Field(default="kwanzaa-adapter", min_length=1, description="MLflow experiment name.")
    log_artifact: bool = Field(default=True, description="Log final_artifact/ to the MLflow run.")


class RegistryConfig(_Section):
    enabled: bool = Field(default=False, description="Register the artifact as an MLflow model version.")
    model_name: str = Field(default="kwanzaa-adapter", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                            description="Registered model name in the MLflow model registry.")


class WandbConfig(_Section):
    project: str = Field(default="kwanzaa-adapter", min_length=1, description="Weights & Biases project.")
    entity: str | None = Field(default=None, description="W&B team or user; default the login's.")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        default=None, description="W&B mode; default WANDB_MODE, else online (which needs a login).")


class MonitoringConfig(_Section):
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Metric backends (Trainer reporting integrations).")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, description="MLflow tracking, used when listed.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow model registry.")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases, used when listed.")

    @field_validator("report_to")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a backend twice")
        return value

    @field_validator("registry")
    @classmethod
    def _registry_needs_mlflow(cls, value: RegistryConfig, info: ValidationInfo) -> RegistryConfig:
        if value.enabled and "mlflow" not in info.data.get("report_to", ["mlflow"]):
            raise ValueError("enabled needs 'mlflow' in monitoring.report_to (the registry is MLflow's)")
        return value


class KwanzaaConfig(_Section):
    """The whole resolved configuration of one run."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    adapter: AdapterConfig
    data: DataConfig
    training: TrainingConfig
    evaluation: EvaluationConfig
    checkpointing: CheckpointConfig
    gate: GateConfig = Field(default_factory=GateConfig)
    evidence: EvidenceConfig = Field(default_factory=EvidenceConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    artifacts: ArtifactConfig = Field(default_factory=ArtifactConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)

    @field_validator("evidence")
    @classmethod
    def _evidence_reads_the_decision_examples(cls, value: EvidenceConfig, info: ValidationInfo) -> EvidenceConfig:
        gate = info.data.get("gate")
        if value.fit and gate is not None and not gate.decision_file:
            raise ValueError("fit needs gate.decision_file: the selector learns from its answerable examples' gold "
                             "answers, in the gate's pass")
        if isinstance(value.depth, int) and value.depth < 1:
            raise ValueError("depth must be >= 1 (or auto)")
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the resolved config: stable across key order and YAML style."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name
