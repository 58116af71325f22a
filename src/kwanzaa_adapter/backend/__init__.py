"""The backend: the model classes and their factory over a verified adapter (`models`), the HTTP API
(`serving`) and the merged export. It may use every layer below the command line; it never imports
training."""
