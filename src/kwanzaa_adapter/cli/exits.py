"""The exit codes of every command, and which errors map to them.

0 success; 1 a verification failed; 2 bad input (config, data, paths, model reference) or a file the
operating system would not read or write (a full disk, say). The error classes are imported when a
command fails, so that a command loads only what it uses.
"""

from __future__ import annotations

EXIT_OK, EXIT_VERIFICATION, EXIT_BAD_INPUT = 0, 1, 2


def bad_input_errors() -> tuple[type[Exception], ...]:
    from kwanzaa_adapter.config import ConfigError
    from kwanzaa_adapter.data.validation import DataError
    from kwanzaa_adapter.evaluation.eval_set import EvaluationDataError
    from kwanzaa_adapter.generation.llamacpp_api import EngineUnavailable
    from kwanzaa_adapter.modeling.derived import DerivationError
    from kwanzaa_adapter.modeling.sources import ModelReferenceError
    from kwanzaa_adapter.reporting.run_report import ReportError
    from kwanzaa_adapter.safety.artifacts import ArtifactError
    from kwanzaa_adapter.tracking.registry import RegistryError
    from kwanzaa_adapter.training.rundir import RunDirectoryError

    # SigningKeyError (an unusable key file) is an ArtifactError. EngineUnavailable and DerivationError:
    # inference.engine llama.cpp (or export --format gguf) where llama.cpp is not built or cannot convert.
    return (ConfigError, DataError, EvaluationDataError, ModelReferenceError, RunDirectoryError, ArtifactError,
            RegistryError, EngineUnavailable, DerivationError, ReportError)


def verification_errors() -> tuple[type[Exception], ...]:
    from kwanzaa_adapter.backend.export import MergeCheckError
    from kwanzaa_adapter.backend.gguf_export import GgufCheckError
    from kwanzaa_adapter.modeling.loading import AdapterVerificationError
    from kwanzaa_adapter.safety.artifacts import SealedFileChangedError
    from kwanzaa_adapter.safety.signing import SignatureError
    from kwanzaa_adapter.training.workflow import ArtifactInvalidError, WeightsChangedError

    return (WeightsChangedError, ArtifactInvalidError, AdapterVerificationError, MergeCheckError, GgufCheckError,
            SignatureError, SealedFileChangedError)
