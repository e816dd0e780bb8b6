"""In-rank helpers: which device and precision this process computes in, and collectives over ranks.

The device rule (one place): `auto` is `cuda:LOCAL_RANK` where CUDA is present, else `cpu`; a config's
`device` key overrides (`cpu`, `cuda`, `cuda:N`). Under torchrun each rank gets its own GPU this way, and
one process on a GPU machine uses the GPU.

Precision: `fp32`, `bf16` or `fp16`. Training keeps fp32 master weights and computes forward passes under
autocast (DeepSpeed keeps its own fp32 master copy); log-probabilities, KL and advantages are computed
in fp32 whatever the precision; inference-only models (references, reward models, engines) run in the
precision's dtype; saved weights carry it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def world() -> tuple[int, int]:
    """(rank, world size) of this process, from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 in one process)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(requested: str = "auto") -> torch.device:
    """The device this rank computes on. `auto`: cuda:LOCAL_RANK if CUDA is present, else cpu; `cuda`:
    cuda:LOCAL_RANK (an error without CUDA); `cpu` or `cuda:N`: as given."""
    requested = (requested or "auto").strip()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {requested!r} was asked for, but torch sees no CUDA device "
                f"(torch {torch.__version__}); set device: cpu or auto"
            )
        if requested == "cuda":
            requested = f"cuda:{local_rank()}"
        index = torch.device(requested).index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {requested!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device(requested)
    if requested != "cpu":
        raise ValueError(f"device {requested!r}: expected auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def bind_device(device: torch.device) -> None:
    """Make `device` this process's current CUDA device (vLLM, NCCL and DeepSpeed read it); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


@functools.cache
def _libc_malloc_trim():
    """glibc's malloc_trim, or None where the C library is not glibc (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
"""glibc's largest mmap threshold on 64-bit: blocks at least this big are always mmapped, never heap."""


def release_host_memory() -> int:
    """Give the pages of freed host memory back to the OS between phases that allocate differently.
    torch's CPU tensors below glibc's mmap threshold live in the C heap, which keeps their pages when they
    are freed. Returns 1 if memory was handed back, 0 if none could be, -1 where glibc's malloc_trim does not
    exist. See `host_memory_release_pays` for when it is worth its cost."""
    trim = _libc_malloc_trim()
    return -1 if trim is None else int(trim(0))


def host_memory_release_pays(model: torch.nn.Module) -> bool:
    """Whether handing the heap's freed pages back between phases lowers the peak RSS of training `model`:
    when it trains in host memory and has a trained tensor of at least GLIBC_MMAP_THRESHOLD_MAX (Gemma's
    256k-row embedding). Such a tensor's gradient is mmapped and cannot reuse the freed heap pages the
    forward pass left, so both are held at the backward pass's peak: 226 MiB of them with the 26M body at
    vocabulary 262144, where releasing them took the RL stage's peak from 3351 to 3224 MiB. With smaller
    tensors the backward pass reuses those pages, and handing them back only costs refaults: 15% of an
    update with the 1M body at vocabulary 512 (bench/README.md)."""
    return any(
        p.requires_grad and p.device.type == "cpu" and p.nbytes >= GLIBC_MMAP_THRESHOLD_MAX for p in model.parameters()
    )


def torch_dtype(precision: str) -> torch.dtype:
    """The compute dtype of a precision name."""
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[precision]


def autocast(device: torch.device, precision: str):
    """Mixed-precision context for forward passes of fp32-master models (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch_dtype(precision))


def is_distributed() -> bool:
    return world()[1] > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def all_ranks_mean(values: dict[str, float]) -> dict[str, float]:
    """Average scalar statistics over ranks (identity in one process)."""
    if not is_distributed():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t)
    return dict(zip(keys, (t / world()[1]).tolist()))


def all_ranks_masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of `x` where `mask` is 1, over every rank's tensors (all ranks call it)."""
    mask = mask.to(x.dtype)
    sums = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if is_distributed():
        sums = sums.to(_collective_device())
        torch.distributed.all_reduce(sums)
        sums = sums.to(x.device)
    n = sums[2].clamp(min=1.0)
    mean = sums[0] / n
    var = (sums[1] / n - mean**2).clamp(min=0.0) * n / (n - 1).clamp(min=1.0)
    return mean.to(x.dtype), var.to(x.dtype)


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (just [obj] in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world()[1]
    torch.distributed.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    """Where tensors for collectives must live: NCCL needs this rank's GPU, gloo takes CPU tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Tensor-parallel groups of colocated engines


def engine_group(tensor_parallel_size: int) -> tuple[int, int, int]:
    """(group index, number of groups, this rank's index inside its group) when the ranks are split into
    consecutive groups of `tensor_parallel_size`, each sharing one vLLM engine (external launcher)."""
    rank, world_size = world()
    if world_size % tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size {tensor_parallel_size} does not divide the {world_size} ranks "
            f"of this stage; choose a divisor of distributed.num_processes"
        )
    return rank // tensor_parallel_size, world_size // tensor_parallel_size, rank % tensor_parallel_size


def shard_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` when n items are split into `parts` near-equal consecutive parts."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)
