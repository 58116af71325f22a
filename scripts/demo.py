"""`make demo`: train the CPU demo adapter end to end, verify it, and print its summary and wall time."""

from __future__ import annotations

import resource
import sys
import time

from kwanzaa_adapter.cli import main as cli


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(config: str = "configs/demo.yaml") -> int:
    from kwanzaa_adapter.train_adapter import train_adapter

    started = time.perf_counter()
    result = train_adapter(config)
    wall = time.perf_counter() - started
    print(f"\nartifact v{result.version} published at {result.artifact_dir}")
    for step in (["verify", str(result.artifact_dir)], ["info", str(result.artifact_dir)]):
        print(f"\n$ kwanzaa-adapter {' '.join(step)}")
        code = cli(step)
        if code:
            return code
    if result.behavior is not None:
        print("\nbehavioral metrics on the eval split, base model vs adapter:")
        print(result.behavior.table())
        for label, speed in result.behavior.generation_tokens_per_second().items():
            print(f"generation ({label}): {speed:.1f} tokens/s")
    s = result.summary
    print(f"\ndemo main job wall time: {wall / 60:.1f} min ({wall:.0f} s); peak RSS {peak_rss_mib():.0f} MiB; "
          f"train tokens/s {s.get('mean_tokens_per_second') or 0:.0f}; final eval loss {s.get('final_eval_loss'):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run(*sys.argv[1:]))
