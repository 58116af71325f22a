"""Tracking: TensorBoard, W&B and MLflow monitoring of a run, and the MLflow model registry. It may use
generation and every layer below it; it never imports evaluation."""
