from .stage import PPO, STAGE  # noqa: F401
