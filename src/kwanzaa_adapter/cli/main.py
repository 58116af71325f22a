"""The `kwanzaa-adapter` command: parse arguments, call library functions, map errors to exit codes.

Exit codes: 0 success; 1 a verification failed; 2 bad input (config, data, paths, model reference)
or a file the operating system would not read or write (a full disk, say).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from kwanzaa_adapter.cli.exits import EXIT_BAD_INPUT, EXIT_OK, EXIT_VERIFICATION, bad_input_errors, verification_errors

# --- commands ----------------------------------------------------------------------------------


def cmd_train(args) -> int:
    if args.dry_run:
        from kwanzaa_adapter.cli.dryrun import plan_run

        print(plan_run(args.config, tuple(args.set), args.output_dir))
        return EXIT_OK
    from kwanzaa_adapter.cli.dryrun import make_plan
    from kwanzaa_adapter.training.workflow import train_adapter

    plan = make_plan(args.config, tuple(args.set), args.output_dir)  # its estimate goes into the run report
    result = train_adapter(args.config, tuple(args.set), args.output_dir, resume=args.resume,
                           estimate=plan.eta.phases if plan.eta else None)
    if result.artifact_dir is None:  # a replica of a multi-process run: the main process reports
        return EXIT_OK
    print(f"artifact v{result.version}: {result.artifact_dir}")
    if result.published.get("model_version"):
        print(f"registered {result.published['registered_model']} version {result.published['model_version']} "
              f"in {result.published['tracking_uri']}")
    s = result.summary
    print(f"final eval loss {s.get('final_eval_loss'):.4f}, perplexity {s.get('final_perplexity'):.2f}, "
          f"{s.get('steps')} steps, {s.get('mean_tokens_per_second') or 0:.0f} tokens/s")
    if result.behavior is not None:
        print(result.behavior.table())
    if result.report is not None:
        print(f"run report: {result.report}")
    return EXIT_OK


def cmd_report(args) -> int:
    from kwanzaa_adapter.reporting.run_report import write_report

    print(f"run report: {write_report(args.run, args.output, tuple(Path(p) for p in args.eval))}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from kwanzaa_adapter.evaluation.behavior import measure_behavior, save_eval_output

    if args.data and not Path(args.data).is_file():
        raise FileNotFoundError(args.data)
    # The backend's path: the adapter verified, and loaded only onto the base model it was trained on.
    from kwanzaa_adapter.cli.backend import load_model

    served, _ = load_model(args)
    report = measure_behavior(served.config, served.model, served.tokenizer, args.data,
                              with_adapter=bool(args.adapter), gate=served.gate, base_digest=served.base_digest,
                              selector=served.selector)
    if served.gate is not None:
        g = served.gate.describe()
        print(f"answerability gate: block {g['layer']}, threshold {g['threshold']:.3f}, calibration AUC "
              f"{g.get('calibration_auc', float('nan')):.3f} (gate.apply=false leaves it out)")
    print(report.table())
    for run in report.runs:
        if run.engine != "lexical":
            print(f"generation {run.label} ({run.engine}): {run.tokens_per_second:.1f} tokens/s")
    if args.output:
        print(f"wrote {save_eval_output(report, Path(args.output))}")
    return EXIT_OK


def cmd_verify(args) -> int:
    from kwanzaa_adapter.backend.export import EXPORT_RECORD, EXPORT_REQUIRED
    from kwanzaa_adapter.safety.artifacts import REQUIRED_FILES, SIGNATURE_NAME, verify_artifact

    directory = Path(args.artifact_dir)
    # A merged export has its own layout (full model, no adapter files) under the same manifest rules.
    required = EXPORT_REQUIRED if (directory / EXPORT_RECORD).is_file() else REQUIRED_FILES
    report = verify_artifact(directory, required_files=required)
    print(report.format())
    signed = None
    if args.public_key:
        from kwanzaa_adapter.safety.signing import verify_signature

        signed = verify_signature(directory, args.public_key)
        print(signed.format())
    elif (directory / SIGNATURE_NAME).is_file():
        print(f"signature {SIGNATURE_NAME} present, not checked: pass --public-key")
    return EXIT_OK if report.ok and (signed is None or signed.ok) else EXIT_VERIFICATION


def cmd_sign(args) -> int:
    from kwanzaa_adapter.safety.signing import private_key_fingerprint, sign_artifact, verify_signature

    signature = sign_artifact(args.artifact_dir, args.private_key, replace=args.replace)
    print(f"signed {signature} with key sha256:{private_key_fingerprint(args.private_key)}")
    if args.public_key:  # the key a backend will trust must accept what was just written
        report = verify_signature(args.artifact_dir, [args.public_key])
        print(report.format())
        return EXIT_OK if report.ok else EXIT_VERIFICATION
    return EXIT_OK


def cmd_keygen(args) -> int:
    from kwanzaa_adapter.safety.signing import generate_key_pair

    private, public = Path(args.out), Path(args.out + ".pub")
    fingerprint = generate_key_pair(private, public)
    print(f"private key {private} (keep it secret; mode 600)\npublic key  {public} (give it to backends: "
          f"--trusted-key)\nkey sha256:{fingerprint}")
    return EXIT_OK


def cmd_info(args) -> int:
    from kwanzaa_adapter.safety.artifacts import ArtifactError, format_info_table

    directory = Path(args.artifact_dir)
    try:
        metadata = json.loads((directory / "metadata.json").read_text())
        metrics = json.loads((directory / "training_metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{directory}: not a readable artifact: {exc}") from None
    print(format_info_table(metadata, metrics))
    return EXIT_OK


def cmd_validate_data(args) -> int:
    from kwanzaa_adapter.data.validation import format_report, validate_file

    tokenizer = None
    if args.config:
        from kwanzaa_adapter.config import load_training_config
        from kwanzaa_adapter.modeling.loading import load_tokenizer
        from kwanzaa_adapter.modeling.sources import materialize, resolve_model_reference

        config = load_training_config(args.config)
        source = resolve_model_reference(config.model.name_or_path, config.model.revision)
        tokenizer = load_tokenizer(materialize(source), config)
        max_len, prompt = config.data.max_seq_length, config.data.system_prompt
    else:
        max_len, prompt = None, None
    failed = False
    for file in args.files:
        kwargs = {"tokenizer": tokenizer, "max_seq_length": max_len}
        if prompt:
            kwargs["system_prompt"] = prompt
        result = validate_file(Path(file), **kwargs)
        print(format_report(result))
        failed = failed or not result.ok
    return EXIT_BAD_INPUT if failed else EXIT_OK


def cmd_schema(args) -> int:
    from kwanzaa_adapter.contract import answer_json_schema

    print(json.dumps(answer_json_schema(), indent=2))
    return EXIT_OK


def cmd_registry_pull(args) -> int:
    from kwanzaa_adapter.tracking.registry import RegistryError, pull_model_version

    if not args.tracking_uri:
        raise RegistryError("no tracking URI: pass --tracking-uri (e.g. sqlite:///outputs/RUN/mlflow.db) "
                            "or set MLFLOW_TRACKING_URI")
    report = pull_model_version(args.name, args.version, Path(args.out), args.tracking_uri, tuple(args.trusted_key))
    print(report.format())
    return EXIT_OK if report.ok else EXIT_VERIFICATION


def cmd_prepare_model(args) -> int:
    from transformers import AutoConfig

    from kwanzaa_adapter.modeling.loading import resolve_device
    from kwanzaa_adapter.modeling.planning import architecture_from_hf_config
    from kwanzaa_adapter.modeling.precision import probe_shape, resolve_precision
    from kwanzaa_adapter.modeling.sources import cache_root, download_hub_model, materialize, resolve_model_reference

    source = resolve_model_reference(args.reference)
    location = download_hub_model(source) if source.kind == "hub" else materialize(source)
    print(location)
    # The probe `precision: auto` takes for this model, measured now and cached for training and serving.
    arch = architecture_from_hf_config(AutoConfig.from_pretrained(location))
    decision = resolve_precision("auto", resolve_device("auto"), probe_shape(arch.hidden_size, arch.intermediate_size),
                                 cache_dir=cache_root() / "precision")
    print(f"on this machine: {decision.describe()}")
    return EXIT_OK


# --- backend: model factory, chat, generate, serve, export (SPEC section 8) -----------------

# --- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from kwanzaa_adapter.cli.backend import add_backend_parsers, model_arguments, trusted_key_argument

    parser = argparse.ArgumentParser(prog="kwanzaa-adapter", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train, verify and publish an adapter")
    p.add_argument("--config", required=True, help="run configuration YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value")
    p.add_argument("--output-dir", help="parent directory of the run directory (run.output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the plan and memory estimate; write nothing")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="behavioral metrics of the baselines (base model under the grammar, lexical "
                                    "rules) and of base+adapter, side by side")
    model_arguments(p)
    p.add_argument("--data", help="eval JSONL (RAG records, or chat form with meta.documents); default data.eval_file")
    p.add_argument("--output", help="write the metrics JSON here, eval_predictions.jsonl beside it")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="write a run's report.html: what was trained, the proofs, training curves, "
                                      "every variant's rates and the answers behind them (one offline page)")
    p.add_argument("run", metavar="RUN_DIR_OR_ARTIFACT", help="a run directory, or its final_artifact")
    p.add_argument("--output", help="the HTML file to write (default RUN_DIR/report.html)")
    p.add_argument("--eval", action="append", default=[], metavar="METRICS_JSON",
                   help="also show an `eval --output` result (repeatable; RUN_DIR/evals/*/metrics.json are shown "
                        "without it)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("verify", help="check an artifact's completeness and integrity (and its signature)")
    p.add_argument("artifact_dir")
    p.add_argument("--public-key", action="append", default=[], metavar="PUB",
                   help="require model.sig to be signed by this EC public key (PEM; repeatable: any of them)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("sign", help="sign a verified artifact with an EC private key (writes model.sig)")
    p.add_argument("artifact_dir")
    p.add_argument("--private-key", required=True, metavar="KEY",
                   help="EC private key, PEM (an encrypted one reads $KWANZAA_ADAPTER_SIGNING_KEY_PASSWORD)")
    p.add_argument("--public-key", metavar="PUB", help="verify the new signature with this public key")
    p.add_argument("--replace", action="store_true", help="replace an existing signature")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("keygen", help="make an EC P-256 key pair for signing: OUT and OUT.pub")
    p.add_argument("out", help="private key file to create (the public key is OUT.pub)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("info", help="an artifact's metadata and metrics as a table")
    p.add_argument("artifact_dir")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("validate-data", help="check dataset files and print statistics")
    p.add_argument("files", nargs="+")
    p.add_argument("--config", help="a run config: adds token-length checks with its model's tokenizer")
    p.set_defaults(func=cmd_validate_data)

    p = sub.add_parser("schema", help="print the kwanzaa.answer.v1 JSON Schema")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("registry", help="the MLflow model registry")
    registry = p.add_subparsers(dest="registry_command", required=True)
    p = registry.add_parser("pull", help="download a registered adapter version and verify it")
    p.add_argument("name", help="registered model name (monitoring.registry.model_name)")
    p.add_argument("version", help="model version number")
    p.add_argument("out", help="new directory to download into")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI, e.g. sqlite:///outputs/RUN/mlflow.db (default $MLFLOW_TRACKING_URI)")
    trusted_key_argument(p)
    p.set_defaults(func=cmd_registry_pull)

    p = sub.add_parser("prepare-model", help="resolve a model reference; convert GGUF/packaged models once")
    p.add_argument("reference", help="packaged name, .gguf file, directory or hub id")
    p.set_defaults(func=cmd_prepare_model)

    add_backend_parsers(sub)
    return parser


def configure_logging(verbose: bool = False) -> None:
    """Timestamped log lines on stderr, as every command prints them."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # bitsandbytes announces an optional CPU kernel package that must be fetched from the hub.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except bad_input_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except verification_errors() as exc:
        print(f"verification failed: {exc}", file=sys.stderr)
        return EXIT_VERIFICATION
    except FileNotFoundError as exc:
        print(f"error: file not found: {exc.filename or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # a full disk, a read-only directory: nothing was published
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

