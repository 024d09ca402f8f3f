"""Hub models at a pinned commit, loaded from one local directory of the Hugging Face cache.

A run.yaml names a hub model by id and commit (`model`, `model_revision`). The trainer resolves
them here to the snapshot directory of the local cache (HF_HOME / HF_HUB_CACHE) and loads the
policy, the tokenizer and the vLLM engine from that directory: TRL builds the colocated engine
from the policy's `name_or_path`, which would otherwise be the bare hub id (the `main` branch, and
a network look-up). `python -m cppo.pipeline prefetch` fills the cache on a host with network;
a compute node then needs no network (HF_HUB_OFFLINE=1 works).

Only `huggingface_hub` is imported, and only on use, so the pipeline's light jobs can call this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


class ModelNotCachedError(FileNotFoundError):
    """The pinned snapshot is not (completely) in the local Hugging Face cache."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a run's model is loaded from, and what it is (for provenance)."""

    path: Path  # the directory every loader reads
    hub_id: str | None = None  # None for a local model directory
    revision: str | None = None  # as requested in run.yaml
    commit: str | None = None  # the snapshot's commit (its directory name in the cache)

    def provenance(self) -> dict[str, str | None]:
        return {
            "path": str(self.path),
            "hub_id": self.hub_id,
            "revision": self.revision,
            "commit": self.commit,
        }


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_snapshot(hub_id: str, revision: str | None) -> Path:
    """The local snapshot directory of `hub_id` at `revision`, without any network access.

    `revision` None means the cached `main` ref. Raises ModelNotCachedError when the snapshot is
    missing or was left incomplete by an interrupted download.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id=hub_id, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError as err:
        raise ModelNotCachedError(
            f"{hub_id}@{revision or 'main'} is not (completely) in the Hugging Face cache "
            f"{hub_cache_dir()}: run `python -m cppo.pipeline prefetch --id {hub_id} --revision "
            f"{revision or '<commit>'} --out <marker.json>` on a host with network, with the same "
            f"HF_HOME / HF_HUB_CACHE as this job ({err})"
        ) from err
    return Path(path)


def download_snapshot(hub_id: str, revision: str | None) -> Path:
    """Download (or complete) the snapshot into the cache and return its directory."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=hub_id, revision=revision))


# what the hub accepts as a model id: "<owner>/<name>" (config/schema.yaml checks the same)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_model(model: str, revision: str | None, *, download: bool = True) -> ResolvedModel:
    """The directory to load `model` from: itself when it is a local directory, else the cached
    snapshot of hub id `model` at `revision` (downloaded when missing, unless `download` is
    False or HF_HUB_OFFLINE is set). A path that does not exist and cannot be a hub id is a
    ValueError naming the missing directory (not a hub error about a repository name)."""
    local = Path(model)
    if not local.is_dir() and (local.exists() or not HUB_ID.match(model)):
        what = "is not a directory" if local.exists() else "does not exist"
        raise ValueError(
            f"model directory {model!r} {what} (and it is not a hub id '<owner>/<name>'); "
            "build it first (for the toy models: the toy_warm_start step) or fix the path"
        )
    if local.is_dir():
        if revision:
            raise ValueError(
                f"run.yaml: 'model_revision' ({revision}) is set but 'model' ({model}) is a local "
                "directory; a revision pins hub ids only"
            )
        return ResolvedModel(path=local)
    try:
        path = cached_snapshot(model, revision)
    except ModelNotCachedError:
        if not download or is_offline():
            raise
        path = download_snapshot(model, revision)
    return ResolvedModel(path=path, hub_id=model, revision=revision, commit=path.name)
