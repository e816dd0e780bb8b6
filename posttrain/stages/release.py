"""release: package a model as a self-contained directory anyone can load, with a model card.

The release is loadable from the directory alone, by transformers and by vLLM: safetensors weights
(sharded by `max_shard_size`, with model.safetensors.index.json when there is more than one shard),
config.json, the tokenizer with the Gemma chat template, generation_config.json stopping on
`<end_of_turn>` and `<eos>`, and README.md: a model card with Hugging Face metadata, the released model's
lineage (base model, data, and every earlier instance it descends from, followed through the inputs the runner
recorded, with its config hash, fingerprint, time and key metrics), the table of the last eval before the
release that evaluated the released weights (else a plain statement that none did), intended use, limitations
and loading snippets. No pickle files.

The directory is written to a temporary sibling, checked (chat template renders the Gemma format, stop
tokens, no pickles) and renamed into place. Pushing to the Hub is opt-in and needs a token in the
environment: without one the stage refuses before writing anything.

Output in run_dir/release/: release/ (artifact kind `release`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..config import ConfigError, ModelDir, Section, ShardSize
from ..manifest import atomic_dir, atomic_write_text
from ..model_card import (
    data_origin,
    data_summary,
    evaluation_of,
    lineage_of,
    read_lineage,
    recipe_identity,
    relative_to_run,
    render_model_card,
)
from .base import Stage

EVAL_RESULTS = "eval_results"
"""The eval stage's artifact (its results.json), under which StageContext.artifacts holds each eval instance's."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""File types that may hold pickled Python objects: never shipped in a release."""


class PushConfig(Section):
    """Upload of the release to the Hugging Face Hub (off by default)."""

    enabled: bool = False
    """Upload the release folder after it is written (huggingface_hub upload_folder)."""
    repo_id: Optional[str] = None
    """Hub repository to upload to, e.g. my-org/posttrain-tiny (required when enabled)."""
    private: bool = True
    """Create the repository as private if it does not exist."""
    token_env: str = "HF_TOKEN"
    """Environment variable holding the Hub token; when it is unset the stage refuses before writing."""
    commit_message: str = "posttrain release"
    """Commit message of the upload."""


class ReleaseConfig(Section):
    """Config of the release stage."""

    model: ModelDir = None
    """Model to release: a directory or a reference like ppo.model; default: the latest earlier stage's model."""
    name: Optional[str] = None
    """Release name (card title); default: the identity name of the synth recipe the model descends from (see
    model_card.recipe_identity), else the run directory's name."""
    license: str = "apache-2.0"
    """License identifier in the card metadata."""
    base_model: Optional[str] = None
    """Hub id of the base model for the card metadata (e.g. google/gemma-2-2b); None when built from config."""
    tags: list[str] = ["posttrain", "gemma-chat-format", "safetensors"]
    """Card metadata tags (the model type is added)."""
    description: Optional[str] = None
    """Summary paragraph of the card; default: one generated from the architecture and the stages."""
    max_shard_size: ShardSize = "2GB"
    """Largest safetensors shard (e.g. 500MB, 2GB); several shards add model.safetensors.index.json."""
    push_to_hub: PushConfig = PushConfig()
    """Optional upload to the Hugging Face Hub."""


class Release(Stage):
    name = "release"
    Config = ReleaseConfig
    consumes = {"model": "model"}
    produces = {"release": "release"}

    def setup(self) -> None:
        from ..models import check_model_dir

        self.token = self.push_token(self.ctx.name, self.cfg)
        run_dir = self.ctx.dir.parent
        self.model_dir = str(check_model_dir(self.ctx.inputs["model"]))
        # Only earlier instances that finished (ctx.artifacts), and of those only the model's ancestors.
        self.lineage = lineage_of(run_dir, self.model_dir, self.ctx.artifacts)
        identity = recipe_identity(self.ctx.pipeline, before=self.ctx.name, lineage=self.lineage)
        self.release_name = self.cfg.name or identity.get("name") or run_dir.name

    @classmethod
    def check_plan(cls, name: str, cfg, inputs: dict, artifacts: dict, kinds: dict) -> None:
        cls.push_token(name, cfg)  # before any stage of the run works, and before this one clears its output

    @staticmethod
    def push_token(name: str, cfg: ReleaseConfig) -> Optional[str]:
        """The Hub token of an enabled upload (None when off); a ConfigError when it cannot be made."""
        push = cfg.push_to_hub
        if not push.enabled:
            return None
        if not push.repo_id:
            raise ConfigError(
                f"{name}.push_to_hub.repo_id: required when push_to_hub.enabled is true (e.g. my-org/posttrain-tiny)"
            )
        token = os.environ.get(push.token_env)
        if not token:
            raise ConfigError(
                f"{name}.push_to_hub: enabled, but the environment variable {push.token_env} "
                f"({name}.push_to_hub.token_env) holds no Hub token; set it, or set "
                f"{name}.push_to_hub.enabled to false. Nothing was written."
            )
        return token

    def train(self) -> dict:
        from ..models import count_parameters, load_model, load_tokenizer, save_generation_config

        # A copy job, no compute: CPU, and the checkpoint's own dtype (the run's precision) is kept.
        model, tokenizer = load_model(self.model_dir, device="cpu"), load_tokenizer(self.model_dir)
        out = self.ctx.dir / "release"
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=self.cfg.max_shard_size)
            tokenizer.save_pretrained(tmp)
            save_generation_config(tokenizer, tmp)
            check_release_dir(tmp)
            info = {
                "architecture": type(model).__name__,
                "model_type": model.config.model_type,
                "parameters": count_parameters(model),
                "dtype": str(model.dtype).removeprefix("torch."),
                "vocab_size": len(tokenizer),
                "max_positions": getattr(model.config, "max_position_embeddings", None),
            }
            atomic_write_text(tmp / "README.md", self._card(info))
        shards = sorted(p.name for p in out.glob("*.safetensors"))
        metrics = {
            "name": self.release_name,
            "source": relative_to_run(self.model_dir, self.ctx.dir.parent),
            "shards": len(shards),
            "bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
        }
        if self.token:
            metrics["pushed"] = self._push(out)
        return metrics

    def _card(self, info: dict) -> str:
        run_dir, pipeline = self.ctx.dir.parent, self.ctx.pipeline
        kinds = {name: self.ctx.kinds[name] for name in self.lineage}
        evaluated = self._evaluation()
        shown = [*self.lineage, evaluated[0]] if evaluated else self.lineage
        data_lines = data_summary(run_dir, pipeline, kinds, self.model_dir) + [
            f"- Weights released from: {relative_to_run(self.model_dir, run_dir)}"
        ]
        origin, example_prompt = data_origin(run_dir, kinds)
        return render_model_card(
            name=self.release_name,
            license_id=self.cfg.license,
            tags=list(dict.fromkeys([*self.cfg.tags, info["model_type"]])),
            base_model=self.cfg.base_model,
            model_info=info,
            records=read_lineage(run_dir, [name for name in self.ctx.kinds if name in shown]),  # pipeline order
            data_lines=data_lines,
            eval_markdown=(run_dir / evaluated[0] / "results.md").read_text() if evaluated else None,
            description=self.cfg.description,
            origin=origin,
            example_prompt=example_prompt,
            evaluated_as=evaluated[1] if evaluated else None,
        )

    def _evaluation(self) -> Optional[tuple[str, str]]:
        """(eval instance, its name for the released model) of the last eval before this release that answered
        with the released weights and wrote its table; None when none did (a later eval's table is not shown)."""
        run_dir, artifacts = self.ctx.dir.parent, self.ctx.artifacts
        results = {
            name: artifacts[f"{name}.{EVAL_RESULTS}"]
            for name, kind in self.ctx.kinds.items()
            if kind == "eval" and f"{name}.{EVAL_RESULTS}" in artifacts and (run_dir / name / "results.md").is_file()
        }
        return evaluation_of(self.model_dir, results)

    def _push(self, folder: Path) -> str:
        """Upload the finished release; returns the commit URL."""
        from huggingface_hub import HfApi

        push = self.cfg.push_to_hub
        api = HfApi(token=self.token)
        api.create_repo(push.repo_id, private=push.private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=push.repo_id, commit_message=push.commit_message)
        self.log.info("[release] pushed to %s", push.repo_id)
        return str(getattr(commit, "commit_url", commit))


def check_release_dir(path: str | Path) -> None:
    """Raise ValueError unless `path` loads on its own as a Gemma-format chat model without pickles."""
    from transformers import AutoTokenizer, GenerationConfig

    from ..chat import END_OF_TURN, EOS, check_gemma_format

    path = Path(path)
    pickles = [p.name for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(f"release {path}: pickle files {pickles} must not be shipped")
    if not list(path.glob("*.safetensors")) or not (path / "config.json").is_file():
        raise ValueError(f"release {path}: no safetensors weights or config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    check_gemma_format(tokenizer, f"release {path}")
    eos = GenerationConfig.from_pretrained(str(path)).eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    wanted = {tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.convert_tokens_to_ids(EOS)}
    if not wanted <= eos:
        raise ValueError(
            f"release {path}: generation_config.json must stop on {END_OF_TURN} and {EOS} "
            f"(ids {sorted(wanted)}), has eos_token_id {sorted(eos)}"
        )


STAGE = Release
