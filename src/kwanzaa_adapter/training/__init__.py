"""Training: the eight steps (`workflow.train_adapter`), the Trainer set-up, the preference stage, sealed
checkpoints and resume, the run directory, publishing, several processes, host memory and fault points.
It may use every layer below the command line; it never imports the backend."""
