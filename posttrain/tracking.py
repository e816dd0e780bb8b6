"""Optional experiment tracking: TensorBoard, Weights & Biases, Trackio or MLflow, chosen by `report_to`.

Nothing is sent anywhere unless a config asks: the default is no tracking. The Trainer-based stages hand
the choice to transformers (its callbacks log every logged metric); our own loops (ppo) log every metric
of every update through `Tracker`. Runs are named `<run_dir name>/<stage>`; TensorBoard event files go to
`run_dir/<stage>/tensorboard/`, and an MLflow run without a tracking URI is stored under `run_dir/mlruns`.
A backend whose package is missing is a configuration error, raised before any work.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
"""Tracking backend (config.TrackingBackend) -> the package that must be installed for it."""


def missing_packages(backends: list[str]) -> list[str]:
    """Packages the named backends need that are not installed."""
    return [PACKAGES[b] for b in backends if importlib.util.find_spec(PACKAGES[b]) is None]


def run_name(stage_dir: Path) -> str:
    return f"{stage_dir.parent.name}/{stage_dir.name}"


def _environment(backends: list[str], stage_dir: Path) -> None:
    """Where the backends write, for this stage (values the user set are kept)."""
    if "tensorboard" in backends:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(stage_dir / "tensorboard")
    if "mlflow" in backends:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (stage_dir.parent / "mlruns").resolve().as_uri())
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", stage_dir.parent.name)
    if "wandb" in backends:
        os.environ.setdefault("WANDB_PROJECT", stage_dir.parent.name)
        os.environ.setdefault("WANDB_DIR", str(stage_dir))


def trainer_settings(backends: list[str], stage_dir: Path) -> dict:
    """TrainingArguments fields for the Trainer-based stages."""
    if not backends:
        return {"report_to": "none"}
    _environment(backends, stage_dir)
    return {"report_to": list(backends), "run_name": run_name(stage_dir)}


class Tracker:
    """Logs a dict of scalars per step to every configured backend (rank 0 only; a no-op without backends)."""

    def __init__(self, backends: list[str], stage_dir: Path, config: dict, enabled: bool = True, first_step: int = 1):
        """`first_step`: the step a resumed run logs first; TensorBoard hides what the interrupted run logged
        from there on, so a resumed run shows each step once."""
        self.backends = list(backends) if enabled else []
        self.writers: dict = {}
        if not self.backends:
            return
        _environment(self.backends, stage_dir)
        name = run_name(stage_dir)
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter

            purge = {"purge_step": first_step} if first_step > 1 else {}
            self.writers["tensorboard"] = SummaryWriter(log_dir=os.environ["TENSORBOARD_LOGGING_DIR"], **purge)
        if "wandb" in self.backends:
            import wandb

            self.writers["wandb"] = wandb.init(name=name, config=config, reinit=True)
        if "trackio" in self.backends:
            import trackio

            self.writers["trackio"] = trackio.init(project=stage_dir.parent.name, name=name, config=config)
        if "mlflow" in self.backends:
            import mlflow

            self.writers["mlflow"] = mlflow.start_run(run_name=name)
            mlflow.log_params({k: str(v)[:250] for k, v in _flat(config).items()})

    def log(self, metrics: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "tensorboard" in self.writers:
            for key, value in scalars.items():
                self.writers["tensorboard"].add_scalar(key, value, step)
        if "wandb" in self.writers:
            self.writers["wandb"].log(scalars, step=step)
        if "trackio" in self.writers:
            import trackio

            trackio.log(scalars, step=step)
        if "mlflow" in self.writers:
            import mlflow

            mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if "tensorboard" in self.writers:
            self.writers["tensorboard"].close()
        if "wandb" in self.writers:
            self.writers["wandb"].finish()
        if "trackio" in self.writers:
            import trackio

            trackio.finish()
        if "mlflow" in self.writers:
            import mlflow

            mlflow.end_run()
        self.writers = {}


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}
