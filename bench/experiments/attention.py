"""CPU attention kernels at the demo's shape (9 heads x 64, 460 tokens, causal): forward and forward + backward."""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float32):
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        q, k, v = (torch.randn(1, 9, 460, 64, dtype=dtype, requires_grad=True) for _ in range(3))
        with sdpa_kernel(backend):
            for _ in range(3):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            tick = time.perf_counter()
            for _ in range(20):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
            forward = (time.perf_counter() - tick) / 20
            tick = time.perf_counter()
            for _ in range(20):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            both = (time.perf_counter() - tick) / 20
        print(json.dumps({"dtype": str(dtype).removeprefix("torch."), "backend": backend.name,
                          "forward_ms": round(forward * 1e3, 2), "forward_backward_ms": round(both * 1e3, 2)}))
