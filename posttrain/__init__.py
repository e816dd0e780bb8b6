"""posttrain: from a base causal LM to an instruction-tuned release (SFT, distillation, reward
modelling, PPO, merging, evaluation), one YAML config for the whole pipeline."""

__version__ = "0.1.0"
