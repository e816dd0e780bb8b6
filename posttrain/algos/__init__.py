"""Algorithm core: pure tensor functions for PPO, distillation and weight merging."""
