"""Weights files from the Hugging Face hub cache, with errors that say how to fix them.

Files are fetched by ``huggingface_hub.hf_hub_download`` into its cache (``HF_HOME`` /
``HF_HUB_CACHE``, laid out as ``models--ORG--NAME/{refs,snapshots,blobs}``). With
``HF_HUB_OFFLINE=1`` (huggingface_hub's own switch) or ``offline=True`` nothing is requested from
the network: a file is found in the cache or the call fails with a message naming the fix. Nothing
here unpickles anything; reading the tensors is :func:`models.backbones.load_state_dict`'s job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backbones import WeightsError


class HubWeightsError(WeightsError):
    """Weights that cannot be obtained from the hub or its cache; the message gives the fix."""


@dataclass(frozen=True)
class HubFile:
    """A file in a hub snapshot: where it is and which commit it came from."""

    repo_id: str
    filename: str
    path: Path
    revision: str  # commit hash of the snapshot

    @property
    def snapshot(self) -> Path:
        return self.path.parent


def _fixes(repo_id: str) -> str:
    return (
        f"accept the licence at https://huggingface.co/{repo_id} and log in "
        "(`huggingface-cli login` or HF_TOKEN), then run once online or "
        f"`huggingface-cli download {repo_id}`; or pass a local weights file instead"
    )


def hub_file(
    repo_id: str,
    filenames: tuple[str, ...] | list[str],
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
) -> HubFile:
    """The first of ``filenames`` that the repository has, from the cache or downloaded into it.

    ``offline`` True never touches the network; None follows huggingface_hub (``HF_HUB_OFFLINE``).
    Raises :class:`HubWeightsError` for a gated repository without access, a missing repository,
    or a file missing from the cache in offline mode, each with the fix in the message."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline_seen = False
    for filename in filenames:
        try:
            path = hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=None if cache_dir is None else str(cache_dir),
                local_files_only=bool(offline),
            )
        except GatedRepoError:
            raise HubWeightsError(
                f"{repo_id} is gated and this account has no access: {_fixes(repo_id)}"
            ) from None
        except RepositoryNotFoundError:
            raise HubWeightsError(
                f"{repo_id}: no such repository on the Hugging Face hub, or it is private/gated for this "
                f"account: {_fixes(repo_id)}"
            ) from None
        except RevisionNotFoundError:
            raise HubWeightsError(f"{repo_id}: revision {revision!r} not found") from None
        except (LocalEntryNotFoundError, OfflineModeIsEnabled):
            offline_seen = True
            continue
        except EntryNotFoundError:
            continue
        path = Path(path)
        return HubFile(repo_id, filename, path, path.parent.name)
    where = cache_dir or _default_cache()
    if offline_seen:
        raise HubWeightsError(
            f"{repo_id}: none of {list(filenames)} is in the Hugging Face cache ({where}) and the hub "
            f"cannot be reached (offline mode or no network): {_fixes(repo_id)}"
        )
    raise HubWeightsError(f"{repo_id}: the repository has none of {list(filenames)}")


def snapshot_json(file: HubFile, name: str, *, offline: bool | None = None) -> dict[str, Any] | None:
    """A JSON document of the same snapshot (``config.json``), or None when the repo has none."""
    try:
        other = hub_file(
            file.repo_id,
            (name,),
            revision=file.revision,
            cache_dir=_cache_root(file.path),
            offline=offline,
        )
    except HubWeightsError:
        return None
    try:
        return json.loads(other.path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(
            f"{other.path}: not valid JSON ({e}); delete it from the cache to refetch"
        ) from None


def cached_file(
    repo_id: str, filenames: tuple[str, ...] | list[str], *, cache_dir: str | Path | None = None
) -> Path | None:
    """The cached path of the first of ``filenames`` at ``main``, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(
            repo_id, filename, cache_dir=None if cache_dir is None else str(cache_dir)
        )
        if isinstance(found, str):
            return Path(found)
    return None


def _cache_root(path: Path) -> Path:
    """The cache directory holding ``.../models--ORG--NAME/snapshots/<rev>/<file>``."""
    for parent in path.parents:
        if parent.name.startswith("models--"):
            return parent.parent
    raise WeightsError(f"{path} is not inside a Hugging Face cache")


def _default_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
