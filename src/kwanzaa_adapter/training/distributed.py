"""Several processes, one run: which process writes and which ones wait.

The engines do the distribution: `torchrun` or `accelerate launch` start the processes, accelerate
sets up the process group, and the Trainer wraps the model in DDP (DeepSpeed, FSDP) and syncs the
gradients. This module only answers the questions the workflow asks around the Trainer: is this
the main process (the one that locks the run directory and writes checksums, artifacts, logs and
metrics), and where must the others wait for it.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass

from kwanzaa_adapter.training.rundir import RunDirectory, RunDirectoryError, open_run_directory


def launched_world_size() -> int:
    """Processes started by torchrun / accelerate launch (they set WORLD_SIZE); 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run; `state` is accelerate's PartialState when there are several."""

    state: object | None = None

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    @property
    def rank(self) -> int:
        return 0 if self.state is None else self.state.process_index

    @property
    def world_size(self) -> int:
        return 1 if self.state is None else self.state.num_processes

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def main_first(self):
        """Context in which the main process goes first (e.g. fills a cache the others then read)."""
        return nullcontext() if self.state is None else self.state.main_process_first()

    def share(self, value):
        """The main process's `value`, on every process."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def gather(self, value) -> list:
        """Every process's `value`, in rank order, on every process."""
        if self.state is None:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])


def process_ranks(device: str) -> Ranks:
    """Join the process group the launcher prepared (gloo on the CPU, NCCL on GPUs), if there is one."""
    if launched_world_size() <= 1:
        return Ranks()
    from accelerate import PartialState

    ranks = Ranks(PartialState(cpu=device == "cpu"))
    if not ranks.is_main:  # one process reports; the others only warn (as the Trainer does for its replicas)
        logging.getLogger("kwanzaa_adapter").setLevel(logging.WARNING)
    return ranks


def open_shared_run_directory(config, resume: bool, ranks: Ranks) -> RunDirectory:
    """The main process chooses, creates and locks the run directory; the others learn where it is.

    A refusal (published artifact, unfinished run, lock held) is raised on every process alike.
    """
    opened, error = None, None
    if ranks.is_main:
        try:
            opened = open_run_directory(config, resume=resume)
        except RunDirectoryError as exc:
            error = str(exc)
    path, version, error = ranks.share((opened.path, opened.version, None) if opened else (None, None, error))
    if error is not None:
        raise RunDirectoryError(error)
    return opened or RunDirectory(path, version)  # no lock: the main process holds it for the run
