"""The base model: references and conversion (`sources`), loading with 4-bit quantization and LoRA
(`loading`), the precision a CPU computes fastest in, and the memory and time plan. It may use the
data, the config, the answer contract and the safety proofs."""
