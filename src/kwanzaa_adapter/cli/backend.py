"""The backend commands of `kwanzaa-adapter` (SPEC section 8): generate, chat, serve, export.

Each loads the config's model class through the factory with the verified adapter (and, with
trusted keys, only a signed one); `exits` maps their errors to exit codes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kwanzaa_adapter.cli.exits import EXIT_BAD_INPUT, EXIT_OK


def load_model(args, validate=None):
    """The config's model class with the verified adapter; `validate` runs first, before any load."""
    from kwanzaa_adapter.backend.models import model_from_config
    from kwanzaa_adapter.config import load_training_config

    config = load_training_config(args.config, tuple(args.set))
    checked = validate(config) if validate else None
    model = model_from_config(config, adapter=args.adapter, allow_base_mismatch=args.allow_base_mismatch,
                              trusted_keys=tuple(args.trusted_key))
    if model.adapter is not None and not model.adapter.base_digest_matches:
        print(f"warning: base model digest differs from the one {args.adapter} was trained on "
              "(--allow-base-mismatch)", file=sys.stderr)
    return model, checked


def cmd_generate(args) -> int:
    from kwanzaa_adapter.cli.console import Style, answer_records, read_records, render_answer

    model, items = load_model(args, lambda config: read_records(args.input, config.data.system_prompt))
    style = Style.for_stream(sys.stdout)
    for item, result in answer_records(model, items, constrained=args.constrained):
        if args.json:
            print(json.dumps({"id": item.id, **result.to_json()}, ensure_ascii=False), flush=True)
        else:
            print(f"{style.bold(item.id)}: {item.example.question}\n{render_answer(result, style)}", flush=True)
    return EXIT_OK


def cmd_chat(args) -> int:
    from kwanzaa_adapter.cli.console import Style, load_documents, run_chat

    documents = load_documents(args.documents) if args.documents else []
    model, _ = load_model(args)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def read(prompt: str) -> str:
        if not args.json:
            return input(prompt)
        line = sys.stdin.readline()  # no prompt written: the output holds only JSON lines
        if not line:
            raise EOFError
        return line.rstrip("\n")

    run_chat(model, documents, read, write, args.max_new_tokens, as_json=args.json,
             style=Style.for_stream(sys.stdout))
    return EXIT_OK



def cmd_serve(args) -> int:
    from kwanzaa_adapter.backend.serving.schemas import ServeLimits, ServeOptions
    from kwanzaa_adapter.backend.serving.server import (
        LOOPBACK_HOSTS,
        SERVE_EXTRA_MISSING,
        api_key_from_environment,
        serve,
        serve_extra_installed,
    )

    if not serve_extra_installed():
        print(f"error: {SERVE_EXTRA_MISSING}", file=sys.stderr)
        return EXIT_BAD_INPUT
    limits = ServeLimits(max_body_bytes=args.max_body_bytes, max_documents=args.max_documents,
                         max_question_chars=args.max_question_chars, max_document_chars=args.max_document_chars,
                         max_new_tokens=args.max_new_tokens)
    api_key = api_key_from_environment()
    if args.host not in LOOPBACK_HOSTS and api_key is None:
        print(f"warning: serving on {args.host} without an API key; set KWANZAA_ADAPTER_API_KEY", file=sys.stderr)
    options = ServeOptions(max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                           queue_timeout_s=args.queue_timeout, gather_ms=args.gather_ms,
                           shutdown_grace_s=args.shutdown_grace, default_system_prompt=not args.no_system_prompt)
    model, _ = load_model(args)
    serve(model, args.host, args.port, limits, api_key, options)
    return EXIT_OK


def cmd_export(args) -> int:
    from kwanzaa_adapter.backend.export import export_merged

    config = None
    if args.config:
        from kwanzaa_adapter.config import load_training_config

        config = load_training_config(args.config, tuple(args.set))
    if args.format == "gguf":
        from kwanzaa_adapter.backend.gguf_export import export_gguf

        path, check = export_gguf(args.adapter, args.merge, config, quant=args.quant,
                                  allow_base_mismatch=args.allow_base_mismatch, trusted_keys=tuple(args.trusted_key))
        print(check.summary())
        if (Path(args.adapter) / "answerability_gate.safetensors").is_file():
            print("note: the adapter's answerability gate is not in the GGUF (a GGUF cannot carry it); llama.cpp "
                  "generates without it. The card records the adapter's rates without the gate.")
        print(f"GGUF: {path}")
        return EXIT_OK
    result = export_merged(args.adapter, args.merge, config, tolerance=args.tolerance,
                           as_trained_tolerance=args.as_trained_tolerance, allow_base_mismatch=args.allow_base_mismatch,
                           trusted_keys=tuple(args.trusted_key))
    print(result.check.summary())
    print(f"merged model: {result.directory}")
    return EXIT_OK


# --- parsers -----------------------------------------------------------------------------------


def model_arguments(p, adapter_required: bool = False) -> None:
    p.add_argument("--config", required=not adapter_required, help="run configuration YAML (base model, prompt)")
    p.add_argument("--adapter", required=adapter_required, help="artifact directory (verified before it is loaded)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="load the adapter even on a base model with another digest than it was trained on")
    trusted_key_argument(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value")


def json_argument(p) -> None:
    p.add_argument("--json", action="store_true",
                   help="one JSON line per answer ({id|question, answer | error, gate}) for scripts, not the "
                        "rendering for people")


def trusted_key_argument(p) -> None:
    p.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                   help="load only an adapter signed by this EC public key (repeatable; adds to "
                        "artifacts.trusted_keys)")


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_backend_parsers(sub) -> None:
    from kwanzaa_adapter.backend.serving.schemas import ServeLimits, ServeOptions

    p = sub.add_parser("generate", help="answer each RAG record of a JSONL file, rendered with its sources (--json: "
                                        "one JSON line per record)")
    model_arguments(p)
    json_argument(p)
    p.add_argument("--input", required=True, help="JSONL of RAG records (or chat lines with meta.documents)")
    p.add_argument("--constrained", action=argparse.BooleanOptionalAction, default=True,
                   help="hold each answer to the contract's JSON Schema (default on; --no-constrained: the "
                        "adapter's own output)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive questions over documents, answers rendered with their sources")
    model_arguments(p)
    json_argument(p)
    p.add_argument("--documents", help="JSON file: a list of documents, or an object with a documents list")
    p.add_argument("--max-new-tokens", type=int, help="generation limit (default evaluation.max_new_tokens)")
    p.set_defaults(func=cmd_chat)

    limits = ServeLimits()
    p = sub.add_parser("serve", help="HTTP API: /v1/answer, /v1/chat/completions, /healthz")
    model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    for name, help_text in (("max_body_bytes", "request body size"), ("max_documents", "documents per request"),
                            ("max_question_chars", "question length"), ("max_document_chars", "document length"),
                            ("max_new_tokens", "generated tokens per request")):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(limits, name),
                       help=f"limit on {help_text} (default %(default)s)")
    options = ServeOptions()
    p.add_argument("--max-batch-size", type=_positive(int), default=options.max_batch_size,
                   help="requests generated together (default %(default)s; 1: one at a time)")
    p.add_argument("--max-queue", type=_positive(int), default=options.max_queue,
                   help="requests that may wait; beyond, 429 with Retry-After (default %(default)s)")
    p.add_argument("--queue-timeout", type=_positive(float), default=options.queue_timeout_s, metavar="SECONDS",
                   help="longest wait for a batch; beyond, 503 (default %(default)s)")
    p.add_argument("--gather-ms", type=float, default=options.gather_ms,
                   help="how long a batch's first request waits for company (default %(default)s)")
    p.add_argument("--shutdown-grace", type=float, default=options.shutdown_grace_s, metavar="SECONDS",
                   help="on SIGTERM, time given to answers in flight (default %(default)s)")
    p.add_argument("--no-system-prompt", action="store_true",
                   help="do not add the training system prompt to chat requests that bring none")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="merge the adapter into its de-quantized base; check logits against the "
                                      "model as trained and the de-quantized base + adapter")
    model_arguments(p, adapter_required=True)
    p.add_argument("--merge", required=True, metavar="OUT", help="new directory for the merged model")
    p.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors",
                   help="safetensors (Transformers) or gguf (llama.cpp, Ollama; without the answerability gate)")
    p.add_argument("--quant", choices=("q8_0", "bf16", "f16"), default="q8_0",
                   help="GGUF weight type (default %(default)s); its logits are checked against the model as trained")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |logit difference| from the de-quantized base + adapter (default 1e-3)")
    p.add_argument("--as-trained-tolerance", type=float, default=None,
                   help="max |logit difference| from the model as trained, 4-bit base + adapter (default: 6 x "
                        "the trained precision's epsilon x the largest |logit|, at least 1e-3)")
    p.set_defaults(func=cmd_export)
