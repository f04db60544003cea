"""Where a registry entry's files live: a Hub repo folder, a zip inside a Hub repo, or a plain HTTPS folder.

These are the `location` of each line of registry.yaml (`registry.py` reads the index; `fetch.py` turns a
location into a local folder). Pure pydantic: nothing here touches the network or imports torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from dictionaries.card import repo_id_problem
from dictionaries.recipe import Strict


def _valid_repo(repo: str) -> str:
    problem = repo_id_problem(repo)  # refused here, not deep inside huggingface_hub at download time
    if problem:
        raise ValueError(problem)
    return repo


class HubLocation(Strict):
    """Files in a Hub repo folder, at a pinned commit."""

    kind: Literal["hub"] = "hub"
    """Discriminator."""
    repo: str
    """Hub repo id `org/name`."""
    revision: str | None
    """The 40-hex commit the files are pinned to; null: unpinned (a release no one has fetched from here yet:
    `dictctl pin` records its commit, and a load pins it in the local cache meanwhile)."""
    subfolder: str = ""
    """Folder inside the repo holding the files ('' for the root)."""
    repo_type: Literal["model", "dataset"] = "model"
    """Kind of Hub repo."""

    _repo = field_validator("repo")(_valid_repo)


class HubZipLocation(Strict):
    """Files inside a zip archive in a Hub repo, at a pinned commit."""

    kind: Literal["hub_zip"] = "hub_zip"
    """Discriminator."""
    repo: str
    """Hub repo id `org/name`."""
    revision: str
    """The 40-hex commit the archive is pinned to."""
    filename: str
    """Path of the zip in the repo."""
    size: int | None = None
    """Size of the zip in bytes."""
    sha256: str | None = None
    """sha256 of the whole zip."""
    member: str
    """Folder inside the zip holding the dictionary's files (ending in `/`)."""

    _repo = field_validator("repo")(_valid_repo)


class UrlLocation(Strict):
    """Files at a plain HTTPS folder (original releases outside the Hub)."""

    kind: Literal["url"] = "url"
    """Discriminator."""
    url: str
    """Base URL; each file's path is appended to it."""


Location = Annotated[HubLocation | HubZipLocation | UrlLocation, Field(discriminator="kind")]
