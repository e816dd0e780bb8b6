"""The RL stage's memory options. `ppo.reference_placement`: a reference read from disk for each scoring
gives the same updates as one held on the device and holds nothing in between; a placement with nothing
to place, or one the run cannot honour, is refused before any loading. `ppo.gradient_checkpointing`:
layers are recomputed in the backward pass and the update is the one without it."""

import gc
import weakref

import pytest
import torch

from posttrain.config import ConfigError
from posttrain.pipeline import check_devices, load_pipeline
from posttrain.stages.ppo.reference import Reference

from .test_devices import gpu
from .test_grpo import _stage
from .test_ppo import _setup


def _track_loads(monkeypatch) -> list:
    """Weak references to every model a Reference loads."""
    loaded, plain = [], Reference._load

    def load(self, device):
        model = plain(self, device)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(Reference, "_load", load)
    return loaded


def test_reference_read_from_disk_gives_the_same_updates_and_is_released(tmp_path, tiny_model_dir, monkeypatch):
    held = _stage(tmp_path / "held", tiny_model_dir)
    held_stats = [held._update(u) for u in range(2)]
    loaded = _track_loads(monkeypatch)
    disk = _stage(tmp_path / "disk", tiny_model_dir, reference_placement="disk")
    assert disk.reference.model is None and len(loaded) == 1  # loaded once at setup, to fail early, then dropped
    disk_stats = [disk._update(u) for u in range(2)]
    assert len(loaded) == 3  # one load per scoring
    gc.collect()
    assert all(ref() is None for ref in loaded)  # nothing of any load is still alive
    for a, b in zip(held_stats, disk_stats, strict=True):
        assert a["kl"] == b["kl"] and a["kl_loss"] == b["kl_loss"] and a["policy_loss"] == b["policy_loss"]
    assert held_stats[1]["kl"] > 0  # the comparison covers a reference that differs from the policy
    for name, tensor in held.policy.state_dict().items():
        assert torch.equal(tensor, disk.policy.state_dict()[name]), name


def test_released_without_a_collection(tmp_path, tiny_model_dir):
    """The loaded weights go when scoring ends (and the caller drops its name), not whenever Python next
    collects cycles."""
    ref = Reference(tiny_model_dir, torch.device("cpu"), torch.float32, "disk")
    gc.disable()
    try:
        with ref.scoring() as model:
            weight = weakref.ref(model.get_input_embeddings().weight)
        del model
        assert weight() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "ppo, message",
    [
        ({"kl_mode": "off", "kl_coef": 0.0}, "no KL term reads a reference"),
        ({"kl_coef": 0.0}, "no KL term reads a reference"),
        ({"lora": {"enabled": True}}, "with LoRA the reference is the policy with its adapters off"),
        ({"reference_mode": "ema"}, "reference_mode 'ema' moves it every update"),
    ],
)
def test_a_placement_with_nothing_to_place_is_refused(tmp_path, tiny_model_dir, ppo, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_pipeline(_setup(tmp_path, tiny_model_dir, ppo={"reference_placement": "disk", **ppo}))
    assert "ppo" in str(err.value)


def test_host_memory_placement_needs_an_accelerator(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_pipeline(_setup(tmp_path, tiny_model_dir, ppo={"reference_placement": "cpu"}))
    with pytest.raises(ConfigError, match="ppo.reference_placement: 'cpu' moves the reference off an accelerator"):
        check_devices(cfg, ["ppo"])  # the runner's check before any stage starts
    with pytest.raises(ValueError, match="off an accelerator; the device is cpu"):
        Reference(tiny_model_dir, torch.device("cpu"), torch.float32, "cpu")


@gpu
def test_host_memory_placement_moves_the_reference_to_the_gpu_only_to_score(tiny_model_dir):
    cuda = torch.device("cuda:0")
    ref = Reference(tiny_model_dir, cuda, torch.bfloat16, "cpu")
    assert next(ref.model.parameters()).device.type == "cpu"
    before = torch.cuda.memory_allocated(cuda)
    with ref.scoring() as model:
        assert next(model.parameters()).device == cuda
        during = torch.cuda.memory_allocated(cuda)
    assert next(ref.model.parameters()).device.type == "cpu"
    weights = sum(p.numel() * p.element_size() for p in ref.model.parameters())
    assert during - before >= weights and torch.cuda.memory_allocated(cuda) - before < weights / 10


@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_the_update(tmp_path, tiny_model_dir, advantage):
    extra = {"advantage": advantage, "kl_mode": "reward"} if advantage == "gae" else {}
    stages = [_stage(tmp_path / "plain", tiny_model_dir, **extra)]
    stages.append(_stage(tmp_path / "ckpt", tiny_model_dir, gradient_checkpointing=True, **extra))
    calls, grads = [], []
    # a pre-hook: the recomputation stops early, once it has what the backward pass needs
    stages[1].policy.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    for stage in stages:
        params = [p for group in stage.policy_h.optimizer.param_groups for p in group["params"]]
        hook = lambda *_, params=params: grads.append([p.grad.clone() for p in params])  # noqa: E731
        stage.policy_h.optimizer.register_step_pre_hook(hook)
        stage._update(0)
    # one rollout: generation and scoring run the layer without grad; training runs it once with grad
    # (the checkpointed forward) and once more in the backward pass (the recomputation)
    assert sum(calls) == 2, calls
    if advantage == "gae":
        assert stages[1].value.model.gradient_checkpointing
    # the same policy gradient (compared before AdamW, whose first step is about the gradient's sign)
    for plain, ckpt in zip(*grads, strict=True):
        torch.testing.assert_close(ckpt, plain, rtol=1e-4, atol=1e-6)


def _rss_anon_mib() -> float:
    line = next(x for x in open("/proc/self/status").read().splitlines() if x.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


def test_release_host_memory_hands_freed_heap_pages_back_to_the_os():
    """Freed small tensors between live ones stay in the C heap's RSS until released (the RL stage calls
    this between generation, scoring, the training forward and the backward pass)."""
    from posttrain.dist.rank import release_host_memory

    if release_host_memory() == -1:
        pytest.skip("the C library is not glibc")
    blocks = [torch.ones(16 * 1024) for _ in range(3200)]  # 64 KiB each: below the mmap threshold
    kept = blocks[::2]  # live blocks between the freed ones: the heap's top cannot shrink on its own
    del blocks
    before = _rss_anon_mib()
    assert release_host_memory() == 1
    assert before - _rss_anon_mib() > 60, "about 100 MiB of freed blocks should have left the RSS"
    assert all(float(b[0]) == 1.0 for b in kept[:10])  # the live ones are untouched


def test_host_memory_is_released_only_where_a_trained_tensor_bypasses_the_heap():
    """A trained CPU tensor of 32 MiB or more (Gemma's 256k-row embedding) has its gradient mmapped, apart
    from the heap's freed pages: only then is releasing them worth the refaults."""
    from posttrain.dist.rank import host_memory_release_pays

    big = torch.nn.Embedding(65536, 128)  # 32 MiB of fp32
    small = torch.nn.Embedding(65535, 128)
    assert host_memory_release_pays(big) and not host_memory_release_pays(small)
    assert not host_memory_release_pays(big.requires_grad_(False))


def test_rl_stage_releases_host_memory_between_its_phases(tmp_path, tiny_model_dir, monkeypatch):
    """After generation, after scoring and before the backward pass when it pays; never for the tiny model."""
    import posttrain.stages.ppo.stage as ppo_stage

    calls = []
    monkeypatch.setattr(ppo_stage, "release_host_memory", lambda: calls.append(1))
    tiny = _stage(tmp_path / "tiny", tiny_model_dir)
    tiny._update(0)
    assert not tiny.releases_host_memory and calls == []
    monkeypatch.setattr(ppo_stage, "host_memory_release_pays", lambda model: True)
    paying = _stage(tmp_path / "paying", tiny_model_dir)
    paying._update(0)
    assert len(calls) == 3
