"""Hugging Face Hub ids (`ORG/NAME[@REVISION]`) resolved from the local Hugging Face cache.

No network and no huggingface_hub: only the cache layout that huggingface_hub writes (and `glm4v download`,
`hf download` and transformers with it) is read:

    CACHE/models--ORG--NAME/
        refs/main                  the commit a branch or tag pointed at when it was fetched (40 hex, no newline)
        blobs/<etag>               each file's bytes, stored once
        snapshots/<commit>/FILE    one folder per fetched commit, its files symlinks into blobs/

CACHE is $HF_HUB_CACHE, else $HUGGINGFACE_HUB_CACHE (its older name), else $HF_HOME/hub, else
$XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub: huggingface_hub's own order.

A REVISION is a branch or tag (a file under refs/), a full commit hash, or a unique prefix (7+ hex) of a
cached commit; without one it is `main`. A local folder of the same name wins over a hub id, as in
transformers. This module imports no torch.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from glm4v_core.errors import GLM4VError

__all__ = ["HubError", "HubId", "cache_location", "parse_hub_id", "repo_folder", "repo_id_of",
           "resolve_hub_id", "resolve_model_folder"]

DEFAULT_REVISION = "main"
COMMIT = re.compile(r"[0-9a-f]{40}")
SHORT_COMMIT = re.compile(r"[0-9a-f]{7,39}")
# huggingface_hub's repo id rule (ASCII): letters, digits, '_', '-', '.'; no '-' or '.' at either end;
# no '--' or '..' anywhere (the cache folder name joins the parts with '--'); at most 96 characters
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"{_PART}/{_PART}")
MAX_REPO_ID = 96
MAX_LISTED = 8  # names per list in an error line


class HubError(GLM4VError):
    """A hub id that is not in the local Hugging Face cache, or a `glm4v download` that was refused or failed."""


@dataclass(frozen=True)
class HubId:
    repo: str  # ORG/NAME
    revision: str = DEFAULT_REVISION

    def __str__(self) -> str:
        return self.repo if self.revision == DEFAULT_REVISION else f"{self.repo}@{self.revision}"


def parse_hub_id(text: str) -> HubId | None:
    """`ORG/NAME[@REVISION]` as a HubId; None for text that is no hub id (then it is a path).

    Raises HubError for a well-formed ORG/NAME whose revision cannot name anything (empty, `..`)."""
    repo, at, revision = text.partition("@")
    if not (REPO_ID.fullmatch(repo) and len(repo) <= MAX_REPO_ID) or "--" in repo or ".." in repo:
        return None
    if at and not _plain_revision(revision):
        raise HubError(f"{text}: {revision!r} is not a revision name; after '@' give a branch, a tag or a commit "
                       "hash, e.g. ORG/NAME@main")
    return HubId(repo, revision if at else DEFAULT_REVISION)


def _plain_revision(revision: str) -> bool:
    """A name that stays inside refs/ (branches may hold '/': refs/pr/1)."""
    parts = revision.split("/")
    return not any(p in ("", ".", "..") for p in parts) and not any(c in "\\:" or not c.isprintable() or c.isspace()
                                                                   for c in revision)


def cache_location() -> tuple[Path, str]:
    """The hub cache folder and the setting that chose it, read now (huggingface_hub reads them once, at import)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return _expand(os.environ[variable]), f"${variable}"
    if os.environ.get("HF_HOME"):
        return _expand(os.environ["HF_HOME"]) / "hub", "$HF_HOME/hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return _expand(os.environ["XDG_CACHE_HOME"]) / "huggingface" / "hub", "$XDG_CACHE_HOME/huggingface/hub"
    return Path(os.path.expanduser("~")) / ".cache" / "huggingface" / "hub", "the default"


def _expand(value: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(value)))


def repo_folder(repo: str, cache: Path | None = None) -> Path:
    """CACHE/models--ORG--NAME."""
    return (cache or cache_location()[0]) / "--".join(("models", *repo.split("/")))


def repo_id_of(folder: Path) -> str | None:
    """ORG/NAME for a cached snapshot folder (CACHE/models--ORG--NAME/snapshots/<commit>), else None."""
    folder = Path(folder)
    parts = folder.parent.parent.name.split("--")
    if folder.parent.name != "snapshots" or not COMMIT.fullmatch(folder.name) or parts[:1] != ["models"]:
        return None
    return "/".join(parts[1:]) if len(parts) == 3 else None


def resolve_model_folder(path: str | Path, what: str = "checkpoint") -> Path:
    """The folder `path` names: a local path as given (it wins, even if it reads as a hub id too); a hub id
    found nowhere here, its cached snapshot folder; anything else unchanged, for the caller's checks to name.

    what: how errors name the argument (e.g. '--checkpoint')."""
    local = Path(path)
    if local.exists() or local.is_symlink():
        return local
    hub_id = parse_hub_id(str(path))
    return local if hub_id is None else resolve_hub_id(hub_id, what)


def resolve_hub_id(hub_id: str | HubId, what: str = "checkpoint") -> Path:
    """The cached snapshot folder of ORG/NAME[@REVISION]; a HubError naming the cache and what it holds if absent."""
    text = str(hub_id)
    if not isinstance(hub_id, str):  # a HubId built by hand gets the same checks as text
        text = f"{hub_id.repo}@{hub_id.revision}"
    if (hub_id := parse_hub_id(text)) is None:
        raise HubError(f"{what} {text!r} is not a hub id: expected ORG/NAME[@REVISION], e.g. THUDM/glm-4v-9b")
    cache, source = cache_location()
    folder = repo_folder(hub_id.repo, cache)
    fetch = f"fetch it with: glm4v download {hub_id}"
    if not folder.is_dir():
        raise HubError(f"{what} {hub_id}: no such folder here, and {hub_id.repo} is not in the Hugging Face cache "
                       f"(no {folder}; the cache is {source}); {fetch}")
    commit = _commit_of(folder, hub_id, what, fetch)
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        raise HubError(f"{what} {hub_id}: {folder / 'refs' / hub_id.revision} points at commit {commit}, but its "
                       f"snapshot folder is missing (a cut-short download or a cleaned cache); {fetch}")
    missing = _missing_shards(snapshot)
    if missing:
        raise HubError(f"{what} {hub_id}: {snapshot} lacks {_listed(missing)} of the shards its "
                       f"model.safetensors.index.json names (a cut-short download); {fetch}")
    return snapshot


def _missing_shards(snapshot: Path) -> list[str]:
    """The shards the snapshot's index names that are not there (a commit has no ref written last to
    guard it); an index that does not read is left to the checkpoint's own checks."""
    try:
        weight_map = json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [s for s in shards if isinstance(s, str) and not (snapshot / s).is_file()]


def _commit_of(folder: Path, hub_id: HubId, what: str, fetch: str) -> str:
    """The commit hash a revision names in this repo's cache: a ref first, then a (prefix of a) snapshot name."""
    ref = folder / "refs" / hub_id.revision
    if ref.is_file():
        try:
            commit = ref.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise HubError(f"{what} {hub_id}: cannot read {ref}: {getattr(e, 'strerror', None) or e}") from None
        if not COMMIT.fullmatch(commit):
            raise HubError(f"{what} {hub_id}: {ref} should hold a 40-hex commit hash, holds {commit[:60]!r}; {fetch}")
        return commit
    wanted = hub_id.revision.lower()
    snapshots = _snapshots(folder)
    if COMMIT.fullmatch(wanted) and wanted in snapshots:
        return wanted
    matches = [s for s in snapshots if SHORT_COMMIT.fullmatch(wanted) and s.startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise HubError(f"{what} {hub_id}: {hub_id.revision!r} is the start of several cached commits "
                       f"({_listed(matches)}); give more of the hash")
    raise HubError(f"{what} {hub_id}: revision {hub_id.revision!r} is not in the Hugging Face cache ({folder} has "
                   f"branches/tags: {_listed(_refs(folder)) or 'none'}; commits: {_listed(snapshots) or 'none'}); "
                   f"{fetch}")


def _snapshots(folder: Path) -> list[str]:
    snapshots = folder / "snapshots"
    return sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []


def _refs(folder: Path) -> list[str]:
    refs = folder / "refs"
    return sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []


def _listed(names: list[str]) -> str:
    shown = ", ".join(n[:12] if COMMIT.fullmatch(n) else n for n in names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")
