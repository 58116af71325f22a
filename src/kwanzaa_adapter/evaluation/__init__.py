"""Evaluation: the eval set, the RAG metrics, base-versus-adapter runs and their reports, and the
behavioral measurement of a trained adapter. It may use generation and every layer below it."""
