"""kwanzaa-adapter: verified QLoRA adapters for citation-grounded RAG chat."""

__version__ = "0.1.0"
