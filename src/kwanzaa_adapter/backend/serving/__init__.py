"""The HTTP API of `kwanzaa-adapter serve`: request schemas and limits, the FastAPI app, the request batcher,
the request guard, Prometheus metrics, and the server that runs them (`server`)."""
