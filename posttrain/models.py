"""Models and tokenizers: train a tokenizer locally, build tiny models of the seed families from
config, load any local Hugging Face causal-LM directory safely, and save complete model directories.

Nothing here touches a model hub: tokenizers are trained on the run's own text, tiny models are built
from a config, and real checkpoints come in as local directories (safetensors only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal, Optional

import torch
from pydantic import Field

from . import attention
from .chat import BOS, CONTROL_TOKENS, END_OF_TURN, EOS, GEMMA_CHAT_TEMPLATE, PAD, START_OF_TURN, UNK
from .config import ModelDir, Section
from .manifest import atomic_dir, widen_to_umask
from .paths import check_model_dir  # noqa: F401  (re-exported: callers check model dirs through models)

Family = Literal["gemma", "gemma2", "recurrent_gemma", "llama"]


class ModelConfig(Section):
    """The base model: a local checkpoint directory, or a tiny model built from these fields."""

    path: ModelDir = None
    """Local Hugging Face model directory to start from; when set, the architecture fields are ignored."""
    trust_remote_code: bool = False
    """Allow custom modelling code shipped inside `path` (off: only built-in architectures load)."""
    family: Family = "gemma2"
    """Architecture of a tiny model built from config."""
    vocab_size: int = Field(512, ge=64)
    """Target vocabulary size of the locally trained tokenizer (control tokens included)."""
    hidden_size: int = Field(128, ge=8)
    """Width of the residual stream."""
    num_layers: int = Field(2, ge=1)
    """Decoder blocks (for recurrent_gemma: recurrent and attention blocks together)."""
    num_heads: int = Field(4, ge=1)
    """Attention heads."""
    num_kv_heads: int = Field(2, ge=1)
    """Key/value heads (grouped-query attention; 1 = multi-query as in Gemma 2B)."""
    head_dim: int = Field(32, ge=4)
    """Width of one attention head."""
    intermediate_size: int = Field(384, ge=8)
    """Width of the gated MLP."""
    max_position_embeddings: int = Field(512, ge=16)
    """Longest sequence the model is built for."""
    sliding_window: int = Field(64, ge=4)
    """Gemma 2 local-attention window and RecurrentGemma's attention window, in tokens."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of the saved model."""


# ----------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on `texts` carrying Gemma's control tokens and chat template.

    Digits are split one per token, as in Gemma's tokenizer, which is what lets tiny models learn
    arithmetic. Control tokens get ids 0-5 (pad, eos, bos, unk, start_of_turn, end_of_turn).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CONTROL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[START_OF_TURN, END_OF_TURN],
    )
    fast.chat_template = GEMMA_CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def stop_token_ids(tokenizer) -> list[int]:
    """Ids generation must stop on: `<eos>` and, for chat models, `<end_of_turn>`."""
    ids = [tokenizer.eos_token_id]
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if eot is not None and eot != tokenizer.unk_token_id and eot not in ids:
        ids.append(eot)
    return ids


# ----------------------------------------------------------------------------------------------
# Tiny models from config


def tiny_config(cfg: ModelConfig, tokenizer):
    """A transformers config for `cfg.family` sized by `cfg`, with the tokenizer's special ids."""
    from transformers import Gemma2Config, GemmaConfig, LlamaConfig, RecurrentGemmaConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype=cfg.dtype,
    )
    if cfg.family == "llama":
        return LlamaConfig(
            **common,
            head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=True,
        )
    if cfg.family == "gemma":
        return GemmaConfig(**common, head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings)
    if cfg.family == "gemma2":
        # Gemma 2: alternating local (sliding window) and global attention, logit soft-capping
        # (attention 50, final 30) and query scaling by head_dim, as in the Gemma 2 report, Table 1.
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.num_layers)]
        return Gemma2Config(
            **common,
            head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_position_embeddings,
            sliding_window=cfg.sliding_window,
            layer_types=layer_types,
            query_pre_attn_scalar=cfg.head_dim,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    # RecurrentGemma (Griffin): two recurrent blocks per local-attention block.
    block_types = [("attention" if i % 3 == 2 else "recurrent") for i in range(cfg.num_layers)]
    return RecurrentGemmaConfig(
        **common, lru_width=cfg.hidden_size, attention_window_size=cfg.sliding_window, block_types=block_types
    )


def build_tiny_model(cfg: ModelConfig, tokenizer, seed: int = 0):
    """A freshly initialised causal LM of `cfg.family`, deterministic given `seed`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(cfg, tokenizer)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_implementation(config.model_type))
    return model.to(getattr(torch, cfg.dtype))


def attention_implementation(model_type: str) -> Optional[str]:
    """Gemma 2 needs eager attention: the SDPA path silently drops attention logit soft-capping,
    which vLLM and the Gemma 2 reference apply (logprobs then disagree with rollouts). It gets eager's
    grouped-query form, which reads keys and values in place (`posttrain/attention.py`)."""
    return attention.register() if model_type == "gemma2" else None


CACHE_FAMILIES = {"llama", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "mistral"}
"""Families whose transformers 5.19 models take a `DynamicCache` of per-layer keys and values plus explicit
position ids, so that a prompt's cache can be computed once and shared (RecurrentGemma's state is not one)."""


def prompt_cache_supported(model, length: int) -> bool:
    """Whether a cached prompt can stand in for recomputing it in `model` (a transformers model, outside
    any peft wrapper), for sequences up to `length` tokens: a cache family, no gradient checkpointing in
    training (it turns the cache off), no ZeRO-3 partitioning, and no sliding window the sequence could reach
    (sliding-window layers drop the cache's oldest entries). Sequence classifiers (value models) too."""
    config = getattr(model, "config", None)  # our RecurrentGemma ValueModel has none
    body = getattr(model, "model", None)
    if getattr(config, "model_type", None) not in CACHE_FAMILIES or body is None:
        return False
    if body.training and getattr(body, "gradient_checkpointing", False):
        return False
    if zero3_partitioned(body):
        # ZeRO-3 gathers the weights with collectives in every forward call: all ranks must make the same
        # calls, and whether a rank's batch shares prompts is its own.
        return False
    window = getattr(config, "sliding_window", None)
    return not window or length < window - 1


def enable_gradient_checkpointing(model, key: str) -> None:
    """Turn on activation recomputation in `model`'s training forward passes (non-reentrant: it needs no
    input that requires grad, so frozen embeddings and LoRA work); `key` names the setting in errors."""
    inner = getattr(model, "base_model", model)  # our ValueModel wraps a backbone
    for candidate in (model, inner):
        if getattr(candidate, "supports_gradient_checkpointing", False):
            candidate.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return
    raise ValueError(f"{key}: {type(model).__name__} does not support gradient checkpointing; set it to false")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Loading and saving local model directories


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        if START_OF_TURN not in tok.get_vocab():
            raise ValueError(f"{path}: tokenizer has no chat template and no {START_OF_TURN} token")
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    return tok


def load_model(
    path: str | Path,
    *,
    device: torch.device | str,
    dtype: Optional[torch.dtype] = None,
    trust_remote_code: bool = False,
    kind: str = "causal_lm",
):
    """Load a local model directory (safetensors only) onto `device`. `kind`: causal_lm, reward (a one-output
    sequence scorer, its head new if `path` holds a causal LM) or classifier (a sequence classifier with the
    labels its config names). `dtype`: the parameter dtype (None: the checkpoint's own); training loads ask
    for float32, the master weights of mixed precision.

    A LoRA adapter directory is loaded onto its recorded base model and merged.
    """
    import json

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = check_model_dir(path)
    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    kwargs = dict(use_safetensors=True, trust_remote_code=trust_remote_code)
    config_file = path / "config.json"
    if config_file.is_file():
        impl = attention_implementation(json.loads(config_file.read_text()).get("model_type", ""))
        if impl:
            kwargs["attn_implementation"] = impl
    if kind == "reward":
        kwargs["num_labels"] = 1  # a scalar head (new, if `path` holds a causal LM)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise ValueError(f"{path}: LoRA adapter whose base model directory {base!r} is not available locally")
        model = cls.from_pretrained(str(check_model_dir(base)), **kwargs)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    else:
        model = cls.from_pretrained(str(path), **kwargs)
    return _place(model, torch.device(device))


def zero3_partitioned(module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned `module`'s weights (it marks each with a `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _place(model, device: torch.device):
    """Move a freshly loaded model to `device`; a ZeRO-3-partitioned one stays put (DeepSpeed places it)."""
    return model if zero3_partitioned(model) else model.to(device)


def save_generation_config(tokenizer, out: str | Path) -> None:
    """generation_config.json that stops on `<end_of_turn>` as well as `<eos>` (transformers and vLLM)."""
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(str(out))


def start_model_dir(stage_dir: Path, trainer, is_main: bool) -> tuple[Path, Path]:
    """(final, partial) model dirs of a Trainer stage's save: rank 0 clears a partial dir a crash left,
    then every rank waits, so all of them write into an empty one. `finish_model_dir` completes it."""
    import shutil

    final, partial = stage_dir / "model", stage_dir / ".model.partial"
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return final, partial


def cast_model_dir(model_dir: Path, dtype: torch.dtype) -> None:
    """Rewrite a saved model directory's floating-point weights in `dtype`, one safetensors file at a time,
    and record it in config.json: a Trainer saves its fp32 master weights, a bf16 run ships bf16."""
    import json

    from safetensors.torch import load_file, save_file

    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors = load_file(path)
        if all(not t.is_floating_point() or t.dtype == dtype for t in tensors.values()):
            continue
        cast = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(cast, tmp, metadata={"format": "pt"})
        tmp.replace(path)
    config = Path(model_dir) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["dtype"] = str(dtype).removeprefix("torch.")
        data.pop("torch_dtype", None)
        config.write_text(json.dumps(data, indent=2) + "\n")


TIED_HEAD, TIED_EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def drop_tied_head_copy(model_dir: Path) -> bool:
    """Remove `lm_head.weight` from a saved model whose config ties it to the input embedding, when the file
    holds both and they are equal: a ZeRO-2 save writes the tied head as a tensor of its own, which
    transformers ignores on load but a merge refuses (its inputs' tensor names differ). True if removed."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    model_dir, where = Path(model_dir), {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            where.update({key: path for key in f.keys() if key in (TIED_HEAD, TIED_EMBEDDING)})
    if len(where) < 2:
        return False
    if not getattr(AutoConfig.from_pretrained(model_dir).get_text_config(), "tie_word_embeddings", False):
        return False
    with safe_open(where[TIED_HEAD], "pt") as head, safe_open(where[TIED_EMBEDDING], "pt") as embedding:
        if not torch.equal(head.get_tensor(TIED_HEAD), embedding.get_tensor(TIED_EMBEDDING)):
            return False  # untied in fact: both are weights
    tensors = load_file(where[TIED_HEAD])
    del tensors[TIED_HEAD]
    tmp = where[TIED_HEAD].with_name(where[TIED_HEAD].name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    tmp.replace(where[TIED_HEAD])
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data.get("weight_map", {}).pop(TIED_HEAD, None)
        index.write_text(json.dumps(data, indent=2) + "\n")
    return True


def finish_model_dir(
    partial: Path, final: Path, tokenizer, generation: bool = True, dtype: Optional[torch.dtype] = None
) -> Path:
    """Complete a directory a Trainer saved weights into, then move it into place in one rename:
    weights in `dtype` (when given), tokenizer, generation config (for models that generate), and no
    `training_args.bin` pickle, use_cache as the model has it."""
    import json
    import os
    import shutil

    drop_tied_head_copy(Path(partial))
    if dtype is not None:
        cast_model_dir(Path(partial), dtype)
    tokenizer.save_pretrained(partial)
    if generation:
        save_generation_config(tokenizer, partial)
    (Path(partial) / "training_args.bin").unlink(missing_ok=True)  # a pickle: never ship one
    config = Path(partial) / "config.json"
    data = json.loads(config.read_text()) if config.is_file() else {}
    if data.get("use_cache") is False:  # a training setting (checkpointing turns it off), not the model's
        data["use_cache"] = True
        config.write_text(json.dumps(data, indent=2) + "\n")
    widen_to_umask(Path(partial))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return Path(final)


def save_model_dir(
    model, tokenizer, out: str | Path, max_shard_size: str = "2GB", dtype: Optional[torch.dtype] = None
) -> Path:
    """Write a complete model directory atomically: safetensors, config, tokenizer, generation config.
    `dtype`: cast the model (in place: saving is its last use) so the weights carry the run's precision."""
    if dtype is not None and next(model.parameters()).dtype != dtype:
        model.to(dtype)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        save_generation_config(tokenizer, tmp)
    return Path(out)
