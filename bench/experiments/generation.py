"""Batched greedy decoding of 24 eval prompts x 64 new tokens: batch 8 or 24, dynamic or static KV cache."""

from __future__ import annotations

import json
import sys
import time

import torch
from peft import LoraConfig, get_peft_model

from kwanzaa_adapter.evaluation.eval_set import load_eval_items
from kwanzaa_adapter.generation.decoding import _encode
from kwanzaa_adapter.modeling import loading as modeling
from kwanzaa_adapter.training.workflow import load_configuration

NEW_TOKENS = 64
precision = sys.argv[1]
config = load_configuration("configs/demo.yaml", (f"model.precision={precision}",), None)
model, tokenizer, _ = modeling.load_base_model(config, "cpu", precision)
model = modeling.prepare_quantized_base(model, config, False)
a = config.adapter
model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, target_modules=list(a.target_modules),
                                         task_type="CAUSAL_LM", init_lora_weights=False)).eval()
prompts = sorted((_encode(tokenizer, item.prompt) for item in load_eval_items(config.data.eval_file)[:24]),
                 key=len, reverse=True)
tokenizer.padding_side = "left"
for cache in ("dynamic", "static"):
    for batch_size in (8, 24):
        tick = time.perf_counter()
        for first in range(0, 24, batch_size):
            batch = tokenizer.pad({"input_ids": prompts[first:first + batch_size]}, return_tensors="pt")
            with torch.inference_mode():
                model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, use_cache=True,
                               **({"cache_implementation": "static"} if cache == "static" else {}))
        seconds = time.perf_counter() - tick
        print(json.dumps({"precision": precision, "cache": cache, "batch_size": batch_size,
                          "seconds": round(seconds, 1), "tok_s": round(24 * NEW_TOKENS / seconds, 1)}), flush=True)
