"""Precision: one setting (`model.precision`), resolved once per run from what the device does fast.

On CUDA, `auto` is bf16 where the device supports it, else fp16. On the CPU it is measured: CPUs
with AVX512-BF16 or AMX multiply bf16 matrices about 3x faster than fp32, while the others (AVX2,
most laptops and older cloud CPUs) have no bf16 kernel and PyTorch falls back to a loop about 150x
slower than fp32. A short probe multiplies matrices of the model's own shapes in both dtypes and
`auto` takes bf16 only where it is clearly faster. The probe is cached per machine (CPU model and
instruction set, torch version, threads, shape), so that serving does not pay it again.

The resolved dtype drives everything that reads one: the unquantized weights, the 4-bit compute
dtype, autocast, evaluation and serving. An explicit bf16 or fp16 on a CPU that emulates it still
runs, with one warning giving the measured factor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("bfloat16", "float16", "float32")
# `auto` takes a reduced precision on the CPU only when its products beat fp32 by this factor: a
# margin over timing noise, and over the casts that reduced-precision training adds.
FAST_FACTOR = 1.2
# A reduced precision slower than fp32 by this factor is called emulated, and warned about.
EMULATED_FACTOR = 2.0
PROBE_TOKENS = 64  # rows of the probe's products: a slice of a micro-batch, a decoding batch
PROBE_BUDGET_SECONDS = 0.15  # after the first two rounds; an emulated kernel stops after its second product
MAX_PROBE_ROUNDS = 50
PROBE_CACHE_FORMAT = "kwanzaa.precision-probe.v3"  # v3: interleaved rounds, one-thread rates
# Environment variables that change which kernels run (used to reproduce an AVX2 CPU on a newer one).
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")


@dataclass(frozen=True)
class MatmulProbe:
    """Measured GFLOP/s of (tokens x k) @ (k x n) products in each dtype, on this machine.

    `gflops` with all `threads` (what a run gets: the wall-time estimate's peak); `single_thread`
    on one thread, which decides the precision: a product on one thread is rarely interrupted by
    other work on the machine, where one on every core waits for its slowest thread.
    """

    shape: tuple[int, int, int]
    gflops: dict[str, float]
    threads: int
    seconds: float
    single_thread: dict[str, float] | None = None

    def speedup(self, dtype: str) -> float:
        """How many times faster `dtype` multiplies than float32 (measured on one thread where it was)."""
        rates = self.single_thread or self.gflops
        return rates[dtype] / rates["float32"]

    def peak(self, dtype: str) -> float:
        """GFLOP/s of a run's products in `dtype`: all threads, or one where other work slowed them more."""
        return max(self.gflops[dtype], (self.single_thread or {}).get(dtype, 0.0))

    @property
    def contended(self) -> bool:
        """fp32 products on all threads slower than on one: the machine was busy while it was measured.

        fp32 always has a native multi-threaded kernel; an emulated bf16 loop gains nothing from threads.
        """
        return self.single_thread is not None and self.gflops["float32"] < self.single_thread["float32"]

    def as_json(self) -> dict:
        out = {"shape": list(self.shape), "gflops": {k: round(v, 2) for k, v in self.gflops.items()},
               "threads": self.threads, "seconds": round(self.seconds, 3)}
        if self.single_thread is not None:
            out["single_thread_gflops"] = {k: round(v, 2) for k, v in self.single_thread.items()}
        return out

    @classmethod
    def from_json(cls, value: dict) -> MatmulProbe:
        single = value.get("single_thread_gflops")
        return cls(tuple(value["shape"]), {k: float(v) for k, v in value["gflops"].items()}, int(value["threads"]),
                   float(value["seconds"]), {k: float(v) for k, v in single.items()} if single else None)


@dataclass(frozen=True)
class PrecisionDecision:
    """What `model.precision` resolved to on this device, and why."""

    setting: str  # auto, bfloat16, float16 or float32, as configured
    resolved: str  # bfloat16, float16 or float32
    device: str
    reason: str
    probe: MatmulProbe | None = None
    probe_cached: bool = False
    warning: str | None = None  # an explicit precision that this CPU emulates

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.resolved)

    @property
    def peak_flops(self) -> float | None:
        """The probe's measured product rate in the resolved dtype (FLOP/s), where there was a probe."""
        if self.probe is None or self.resolved not in self.probe.gflops:
            return None
        return self.probe.peak(self.resolved) * 1e9

    def describe(self) -> str:
        text = f"precision {self.resolved} ({self.setting}: {self.reason})"
        if self.probe is not None:
            rates = ", ".join(f"{k} {v:.1f}" for k, v in self.probe.gflops.items())
            m, k, n = self.probe.shape
            text += (f"; probe {m}x{k}x{n} products, GFLOP/s {rates}, {self.probe.threads} threads"
                     f"{', cached' if self.probe_cached else f', {self.probe.seconds:.2f} s'}")
        return text

    def as_json(self) -> dict:
        out = {"setting": self.setting, "resolved": self.resolved, "device": self.device, "reason": self.reason,
               "probe": self.probe.as_json() if self.probe else None, "probe_cached": self.probe_cached}
        if self.warning:
            out["warning"] = self.warning
        return out


# --------------------------------------------------------------------------- the probe


def measure_products(shape: tuple[int, int, int], dtypes: tuple[str, ...] = ("float32", "bfloat16"),
                     budget: float = PROBE_BUDGET_SECONDS, device: str = "cpu") -> MatmulProbe:
    """GFLOP/s of `shape` products per dtype, on all threads and (on the CPU) on one.

    Each measurement is the best of rounds that take one product of each dtype in turn: interleaved,
    so that a burst of load slows both dtypes alike, and the best, so that one clean product each is
    enough. The first product of each dtype is a warm-up (kernel selection, weight packing). At
    least two rounds, then more until `budget` seconds have passed: an emulated kernel (~0.1 s a
    product at the probe's shape) ends a measurement after two.
    """
    m, k, n = shape
    flops = 2.0 * m * k * n
    generator = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    started = time.perf_counter()
    operands = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        operands[name] = (torch.randn(m, k, generator=generator).to(device=device, dtype=dtype),
                          torch.randn(k, n, generator=generator).to(device=device, dtype=dtype))

    def timed(name: str) -> float:
        a, b = operands[name]
        sync()
        tick = time.perf_counter()
        torch.mm(a, b)
        sync()
        return time.perf_counter() - tick

    def rates() -> dict[str, float]:
        for name in dtypes:
            timed(name)  # warm-up
        best = dict.fromkeys(dtypes, float("inf"))
        rounds, measuring = 0, time.perf_counter()
        while rounds < 2 or (time.perf_counter() - measuring < budget and rounds < MAX_PROBE_ROUNDS):
            for name in dtypes:
                best[name] = min(best[name], timed(name))
            rounds += 1
        return {name: flops / max(seconds, 1e-9) / 1e9 for name, seconds in best.items()}

    threads = torch.get_num_threads()
    all_threads = rates()
    single = None
    if device == "cpu" and threads > 1:
        try:
            torch.set_num_threads(1)
            single = rates()
        finally:
            torch.set_num_threads(threads)
    return MatmulProbe(shape, all_threads, threads, time.perf_counter() - started, single)


def probe_shape(hidden_size: int, intermediate_size: int) -> tuple[int, int, int]:
    """The model's MLP up-projection over a slice of tokens: its most common product."""
    return (PROBE_TOKENS, hidden_size, intermediate_size)


# --------------------------------------------------------------------------- the per-machine cache


def machine_identity(device: str = "cpu") -> dict:
    """What makes two machines multiply at the same speed: CPU model, instruction set, kernels allowed,
    threads, torch version; and the GPU's name for a CUDA probe."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "flags": sorted(f for f in CPU_FLAGS if f in flags),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "isa_environment": {v: os.environ[v] for v in ISA_VARIABLES if v in os.environ},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        **({"gpu": torch.cuda.get_device_name(0)} if device == "cuda" else {}),
    }


def cache_key(shape: tuple[int, int, int], dtypes: tuple[str, ...], device: str = "cpu") -> tuple[str, dict]:
    identity = {**machine_identity(device), "shape": list(shape), "dtypes": list(dtypes)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return digest[:24], identity


def cached_probe(shape: tuple[int, int, int], dtypes: tuple[str, ...], cache_dir: Path | None,
                 measure: Callable[..., MatmulProbe] = measure_products,
                 device: str = "cpu") -> tuple[MatmulProbe, bool]:
    """The probe for this machine and shape: read from `cache_dir` when measured before, else measured
    and written there. An unreadable or foreign cache file is measured again and replaced."""
    if cache_dir is None:
        return measure(shape, dtypes, device=device), False
    key, identity = cache_key(shape, dtypes, device)
    path = cache_dir / f"{key}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") == PROBE_CACHE_FORMAT and record.get("identity") == identity:
            return MatmulProbe.from_json(record["probe"]), True
        log.warning("precision probe cache %s does not match this machine; measuring again", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("precision probe cache %s is unreadable (%s); measuring again", path, exc)
    probe = measure(shape, dtypes, device=device)
    if probe.contended:  # it still decides; a quieter moment measures the rates worth keeping
        log.info("precision probe measured on a busy machine; not cached")
        return probe, False
    record = {"format": PROBE_CACHE_FORMAT, "identity": identity, "probe": probe.as_json()}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        staging.replace(path)
    except OSError as exc:  # a read-only home: the probe still decides, it is only measured again next time
        log.warning("cannot cache the precision probe in %s: %s", cache_dir, exc)
    return probe, False


# --------------------------------------------------------------------------- the decision


_WARNED: set[tuple[str, str]] = set()


def resolve_precision(setting: str, device: str, shape: tuple[int, int, int], *, cache_dir: Path | None = None,
                      cuda_bf16: Callable[[], bool] | None = None,
                      measure: Callable[..., MatmulProbe] = measure_products) -> PrecisionDecision:
    """`model.precision` on `device` for a model whose typical product is `shape` (see probe_shape)."""
    if device == "cuda":
        return _resolve_cuda(setting, cuda_bf16 or _cuda_bf16_supported)
    if setting == "float32":
        return PrecisionDecision(setting, "float32", device, "set in the config")
    candidate = "bfloat16" if setting == "auto" else setting
    probe, cached = cached_probe(shape, ("float32", candidate), cache_dir, measure)
    speedup = probe.speedup(candidate)
    if setting == "auto":
        fast = speedup >= FAST_FACTOR
        verdict = "clearly faster" if fast else ("emulated" if speedup < 1 / EMULATED_FACTOR else "not clearly faster")
        reason = f"bf16 products {_factor(speedup)} fp32 on this CPU, {verdict}"
        return PrecisionDecision(setting, "bfloat16" if fast else "float32", device, reason, probe, cached)
    reason = f"set in the config; {candidate} products {_factor(speedup)} fp32 on this CPU"
    warning = None
    if speedup < 1 / EMULATED_FACTOR:
        warning = (f"model.precision: {candidate} runs {1 / speedup:.0f}x slower than float32 on this CPU "
                   f"({probe.gflops[candidate]:.1f} vs {probe.gflops['float32']:.1f} GFLOP/s: no native {candidate} "
                   "kernel); `precision: auto` would choose float32")
        if (candidate, device) not in _WARNED:
            _WARNED.add((candidate, device))
            log.warning(warning)
    return PrecisionDecision(setting, candidate, device, reason, probe, cached, warning)


def _cuda_bf16_supported() -> bool | None:
    """Whether the GPU has bf16; None when there is no GPU here (a dry run planned for one)."""
    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None


def _resolve_cuda(setting: str, bf16_supported: Callable[[], bool | None]) -> PrecisionDecision:
    if setting != "auto":
        return PrecisionDecision(setting, setting, "cuda", "set in the config")
    supported = bf16_supported()
    if supported is None:
        return PrecisionDecision(setting, "bfloat16", "cuda",
                                 "no GPU here to ask; bf16 assumed, as on Ampere and newer")
    if supported:
        return PrecisionDecision(setting, "bfloat16", "cuda", "the GPU supports bf16")
    return PrecisionDecision(setting, "float16", "cuda", "the GPU has no bf16; fp16 with loss scaling")


def _factor(speedup: float) -> str:
    return f"{speedup:.2f}x" if speedup >= 1 else f"1/{1 / speedup:.0f} of"
