"""Processes, devices and precision: decided here and nowhere else.

- `rank`: this process's place in a launch (rank, world size, its device), precision (dtypes and
  autocast), all-rank reductions and the tensor-parallel groups vLLM engines are built over.
- `trainable`: the optimisation handles of our own loops (one process, or DeepSpeed ZeRO ranks) and the
  TrainingArguments / DeepSpeed settings of the Trainer-based stages.
- `launcher`: starting a stage as N torchrun ranks (the parent side; `posttrain.launch` is the rank side).
"""
