"""llama.cpp's C API through `llama-cpp-python`: the bindings, loaded once, and `BlockTap`, the evaluation
callback that reads one decoder block's output while a prompt is pre-filled (the answerability gate's
features, computed by the engine that generates)."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

LLAMACPP_MISSING = ("the llama.cpp engine is not installed in this environment: `make setup` builds it "
                    "(scripts/build_llamacpp.sh)")


class EngineUnavailable(RuntimeError):
    """The fast engine cannot run here (not built, or the model cannot be converted); the reference runs."""


@functools.lru_cache(maxsize=1)
def bindings():
    """The `llama_cpp` C-API module, the backend initialised once, llama.cpp's logging silenced."""
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as exc:  # OSError: bindings present, library missing
        raise EngineUnavailable(f"{LLAMACPP_MISSING} ({type(exc).__name__}: {exc})") from None
    llama_cpp.llama_backend_init()
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(quiet, None)
    bindings.keep = quiet  # the C side holds a pointer to it: it must outlive every call
    return llama_cpp


@functools.lru_cache(maxsize=1)
def ggml_base():
    """libggml-base beside the bindings' library: tensor names and data for the evaluation callback."""
    llama_cpp = bindings()
    directory = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
    lib = ctypes.CDLL(str(directory / "libggml-base.so"))
    lib.ggml_get_name.argtypes, lib.ggml_get_name.restype = [ctypes.c_void_p], ctypes.c_char_p
    lib.ggml_nbytes.argtypes, lib.ggml_nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
    lib.ggml_nelements.argtypes, lib.ggml_nelements.restype = [ctypes.c_void_p], ctypes.c_int64
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


class BlockTap:
    """The evaluation callback: while armed, copies block `layer`'s output at the last token of the batch."""

    def __init__(self, layer: int, width: int):
        self.name, self.width = f"l_out-{layer - 1}".encode(), width
        self.armed, self.value = False, None
        self.callback = bindings().ggml_backend_sched_eval_callback(self._observe)

    def _observe(self, tensor, ask, _data) -> bool:
        if not self.armed:
            return not ask  # unarmed: nothing asked for, and nothing to stop
        lib = ggml_base()
        if ask:
            return lib.ggml_get_name(tensor) == self.name
        size = lib.ggml_nbytes(tensor)
        if size != lib.ggml_nelements(tensor) * 4 or size % (self.width * 4):
            raise RuntimeError(f"{self.name.decode()} is not float32 rows of {self.width}")
        row = np.empty(self.width, dtype=np.float32)
        lib.ggml_backend_tensor_get(tensor, row.ctypes.data, size - self.width * 4, self.width * 4)
        self.value = row  # a prompt longer than one micro-batch: the last call holds the last token
        return True
