"""The RL stage's frozen reference model and where it lives between its scoring forwards.

Its weights are read only once per update, for the reference logprobs of the rollout; the rest of the
update (generation, the training forward and backward, the optimiser step) never touches them. So
instead of holding them on the training device throughout, the reference can wait elsewhere:

- `device`: on the training device all the time (fastest; costs a model copy of device memory);
- `cpu`: in host memory, moved to the accelerator for the scoring forward and back afterwards, as
  OpenRLHF's `--ref_reward_offload` and verl's reference `param_offload` do (two host-device copies per
  update);
- `disk`: nowhere; read again from its model directory (safetensors, usually in the page cache) for each
  scoring and released afterwards. This frees its memory on a CPU-only machine too, at the cost of one
  load per update; a reference that changes while training (WARP's EMA anchor) cannot use it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

import torch

from ...models import load_model

Placement = Literal["device", "cpu", "disk"]


class Reference:
    """A frozen causal LM in `dtype`, brought to `device` by `scoring()` from where `placement` keeps it."""

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype, placement: Placement):
        if placement == "cpu" and device.type == "cpu":
            raise ValueError("reference_placement 'cpu' moves the reference off an accelerator; the device is cpu")
        self.path, self.device, self.dtype, self.placement = path, device, dtype, placement
        home = torch.device("cpu") if placement == "cpu" else device
        # `disk` loads once here too: a directory that does not load fails before any rollout.
        self.model = self._load(home)
        if placement == "disk":
            self.model = None

    def _load(self, device: torch.device):
        return load_model(self.path, device=device, dtype=self.dtype).eval().requires_grad_(False)

    @contextmanager
    def scoring(self) -> Iterator[torch.nn.Module]:
        """The reference on the training device for the body of the `with`; afterwards back where it lives."""
        if self.placement == "device":
            yield self.model
            return
        if self.placement == "cpu":
            try:
                yield self.model.to(self.device)
            finally:
                self.model.to("cpu")
            return
        model = self._load(self.device)
        try:
            yield model
        finally:
            del model  # the caller's name is the last one: its weights go when it drops it

    def load_state(self, state: dict) -> None:
        """Copy `state` (name -> tensor, any device) into the held weights (WARP's EMA anchor)."""
        if self.model is None:
            raise RuntimeError("a reference read from disk for each scoring cannot hold a moving anchor")
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                tensor.copy_(state[name])
