"""The top layer: the `kwanzaa-adapter` command (`main`), its backend commands (`backend`), the console
chat, the dry-run plan and the exit codes. It may use every layer below; nothing imports it."""

from kwanzaa_adapter.cli.main import configure_logging, main

__all__ = ["configure_logging", "main"]
