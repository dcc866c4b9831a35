"""Fetch a Hub repo into the local Hugging Face cache through huggingface_hub (the [download] extra).

The files land where glm4v_core.hub resolves `ORG/NAME[@REVISION]` from: CACHE/models--ORG--NAME/, one blob
per file, a snapshot folder of symlinks, refs/REVISION. Everything here is huggingface_hub's own machinery,
so a file cut short (Ctrl-C, a dropped connection) resumes from its `.incomplete` part on the next run, and
the files already fetched are not asked for again.

The files are fetched one at a time in the calling thread (huggingface_hub's snapshot_download uses a thread
pool whose running downloads finish before Ctrl-C can end the process); the commit is pinned first, so every
file comes from the same commit even if the branch moves meanwhile.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from glm4v_core.hub import COMMIT, DEFAULT_REVISION, HubError, HubId, cache_location, parse_hub_id, repo_folder

__all__ = ["INSTALL", "PICKLE_PATTERNS", "download_snapshot", "select_files"]

INSTALL = "pip install 'glm4v-core[download]'"
# pickled weights run code when they are loaded; glm4v-core reads safetensors only
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.tar", "*.joblib", "*.bin.gz",
                   "*.pt.gz", "*.pth.gz", "*.pkl.gz")
MAX_LISTED = 5


def download_snapshot(repo: str, revision: str = DEFAULT_REVISION, include: Sequence[str] = (),
                      allow_pickle: bool = False, log: TextIO | None = sys.stderr) -> Path:
    """Fetch ORG/NAME at `revision` (branch, tag or commit) into the Hugging Face cache; returns its snapshot
    folder (what `--checkpoint` and load_model take).

    include: fnmatch patterns (`*.json`, `dir/`); only matching files are fetched (default: all). Pickled
    weights (PICKLE_PATTERNS) are skipped unless allow_pickle; a repo whose weights are pickles only is
    refused. log: where the per-file lines go (huggingface_hub draws its progress bars on stderr).
    Raises HubError (one line) for a refusal or a failure; KeyboardInterrupt leaves a resumable cache."""
    if "@" in repo or parse_hub_id(repo) is None:
        raise HubError(f"{repo!r} is not a hub id: expected ORG/NAME (the revision apart), e.g. THUDM/glm-4v-9b")
    hub_id = parse_hub_id(f"{repo}@{revision}")  # a revision that cannot name a ref is refused here
    hf = _import_huggingface_hub()
    cache = cache_location()[0]
    with hub_failures(hf, hub_id):
        commit, sizes = _listing(hf, hub_id)
    files, skipped = select_files(sorted(sizes), include, allow_pickle, str(hub_id))
    snapshot = repo_folder(hub_id.repo, cache) / "snapshots" / commit
    _say(log, f"{hub_id}: commit {commit[:12]}, {len(files)} file(s), {_size(sum(sizes[f] or 0 for f in files))}"
              f" -> {snapshot}")
    if skipped:
        _say(log, f"skipping {len(skipped)} pickle file(s) ({_listed(skipped)}): the .safetensors hold the "
                  "weights; --allow-pickle fetches them too")
    for i, name in enumerate(files, 1):
        cached = (snapshot / name).exists()
        _say(log, f"[{i}/{len(files)}] {name} ({_size(sizes[name])}{', cached' if cached else ''})")
        with hub_failures(hf, hub_id, name):
            hf.hf_hub_download(hub_id.repo, name, revision=commit, cache_dir=cache)
    folder = repo_folder(hub_id.repo, cache)
    held = _ref_commit(folder, hub_id.revision)
    if include and held not in (None, commit):  # part of a commit: the ref keeps naming the one fetched whole
        _say(log, f"refs/{hub_id.revision} stays at {held[:12]}: --include fetched part of {commit[:12]} only")
    else:
        with hub_failures(hf, hub_id):
            _write_ref(folder, hub_id.revision, commit)
    return snapshot


def select_files(names: Sequence[str], include: Sequence[str], allow_pickle: bool, label: str) -> tuple[list, list]:
    """(files to fetch, pickle files skipped) among a repo's file names; HubError when nothing usable is left."""
    patterns = [p + "*" if p.endswith("/") else p for p in include]  # `dir/`: everything under it
    chosen = [n for n in names if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise HubError(f"--include {' '.join(include)} matches none of the {len(names)} files of {label} "
                       f"({_listed(names)})")
    pickles = [n for n in chosen if is_pickle(n)]
    if allow_pickle or not pickles:
        return chosen, []
    if not any(n.lower().endswith(".safetensors") for n in names):
        raise HubError(f"{label} has only pickled weights ({_listed(pickles)}) and no .safetensors; glm4v-core "
                       "loads safetensors only (--allow-pickle fetches the pickles anyway)")
    rest = [n for n in chosen if n not in pickles]
    if not rest:
        raise HubError(f"--include {' '.join(include)} selects only pickle files of {label} ({_listed(pickles)}); "
                       "its weights are in .safetensors files, or pass --allow-pickle")
    return rest, pickles


def is_pickle(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name.lower(), p) for p in PICKLE_PATTERNS)


def _import_huggingface_hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.utils  # its error classes, there in every version since 0.23
    except ImportError:
        raise HubError(f"glm4v download needs huggingface_hub, which is not installed: {INSTALL}") from None
    return huggingface_hub


def _listing(hf, hub_id: HubId) -> tuple[str, dict[str, int | None]]:
    """The commit the revision is at now, and every file of it with its size (None if the Hub gives none)."""
    info = hf.HfApi().model_info(hub_id.repo, revision=hub_id.revision, files_metadata=True)
    if not info.sha or not COMMIT.fullmatch(info.sha) or not info.siblings:
        raise HubError(f"the Hub's answer for {hub_id} lists no commit or no files (sha {info.sha!r}, "
                       f"{len(info.siblings or [])} files)")
    return info.sha, {s.rfilename: s.size for s in info.siblings}


@contextlib.contextmanager
def hub_failures(hf, hub_id: HubId, file: str | None = None) -> Iterator[None]:
    """huggingface_hub's and the network's exceptions as one-line HubErrors that say what to do."""
    errors, endpoint = hf.utils, hf.constants.ENDPOINT
    what = f"{hub_id}" + (f": {file}" if file else "")
    again = "run the same command again to resume (finished files are kept, a partial one continues)"
    try:
        yield
    except HubError:  # ours, already one line (a ValueError too: it must not reach the last clause)
        raise
    except errors.OfflineModeIsEnabled:
        raise HubError(f"{what}: HF_HUB_OFFLINE is set, so huggingface_hub does not download; unset it") from None
    except errors.GatedRepoError:
        raise HubError(f"{hub_id.repo} is gated: accept its terms on its Hub page, then log in (`hf auth login`, "
                       "or set HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{hub_id.repo} was not found on {endpoint} (a typo, or a private repo: log in with "
                       "`hf auth login` or set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{hub_id.repo} has no revision {hub_id.revision!r} on {endpoint} (a branch, tag or commit "
                       "hash)") from None
    except errors.LocalEntryNotFoundError as e:  # the network failed and the file is not cached
        raise HubError(f"{what}: could not reach {endpoint} ({_reason(e.__cause__ or e)}); {again}") from None
    except errors.EntryNotFoundError:
        raise HubError(f"{what}: not found on {endpoint} at that commit (deleted meanwhile?); run again") from None
    except errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", "?")
        raise HubError(f"{what}: {endpoint} answered HTTP {status} ({_reason(e)}); {again}") from None
    except _network_errors() as e:
        raise HubError(f"{what}: the download from {endpoint} failed ({_reason(e)}); {again}") from None
    except OSError as e:
        if e.errno is None:  # huggingface_hub's own checks, e.g. a size that does not match the Hub's
            raise HubError(f"{what}: {_reason(e)}; {again}") from None
        raise HubError(f"{what}: cannot write into {cache_location()[0]}: {e.strerror}") from None  # disk full...
    except (ValueError, RuntimeError) as e:  # huggingface_hub's and its Xet / hf_transfer backends' other refusals
        raise HubError(f"{what}: {_reason(e)}") from None


def _network_errors() -> tuple[type[BaseException], ...]:
    """requests' (huggingface_hub < 1.0) and httpx's (1.0 on) transport errors, whichever are installed."""
    found = []
    with contextlib.suppress(ImportError):
        import requests
        found.append(requests.RequestException)
    with contextlib.suppress(ImportError):
        import httpx
        found.append(httpx.HTTPError)
    return tuple(found)


def _write_ref(folder: Path, revision: str, commit: str) -> None:
    """refs/REVISION -> commit, as huggingface_hub writes it, once every file is in (so a cut-short download never
    moves a branch onto a half-filled snapshot). A commit hash names itself: no ref."""
    if revision == commit or _ref_commit(folder, revision) == commit:  # unchanged: a read-only cache stays usable
        return
    ref = folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)  # atomic: a reader sees the old commit or the new one


def _ref_commit(folder: Path, revision: str) -> str | None:
    """The commit refs/REVISION holds now, None without one (or unreadable: then it is written anew)."""
    try:
        return (folder / "refs" / revision).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _reason(e: BaseException) -> str:
    """An exception's text on one line, bounded."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:MAX_LISTED]) + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    if n < 1000:
        return f"{n} B"
    exponent = min(3, (len(str(n)) - 1) // 3)  # kB, MB, GB
    return f"{n / 1000 ** exponent:.1f} {('kB', 'MB', 'GB')[exponent - 1]}"


def _say(log: TextIO | None, line: str) -> None:
    if log is not None:
        print(line, file=log, flush=True)
