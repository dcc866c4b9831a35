"""A Hugging Face cache laid out as huggingface_hub lays it out, and a fake Hub on 127.0.0.1 for `glm4v download`.

The fake Hub answers only what huggingface_hub's HfApi.model_info and hf_hub_download ask (0.23 .. 0.36):

    GET  /api/models/ORG/NAME/revision/REV          {"id", "sha", "siblings": [{"rfilename", "size"}]}
    HEAD /ORG/NAME/resolve/REV/FILE                 X-Repo-Commit, ETag, Content-Length
    GET  /ORG/NAME/resolve/REV/FILE                 the bytes (a `Range: bytes=N-` request gets 206 and the rest)

An unknown repo or revision gets a 404 with the X-Error-Code the Hub sends. Every request is logged; `stall`
names a file whose first GET sends half its bytes and then holds the connection open (until `release`, 30 s at
most), like a connection that hangs mid-download.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

MAX_REQUESTS = 300  # a runaway retry loop is answered 500 after this many, not served forever


def blob_name(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_cached_repo(cache: Path, repo: str, files: dict[str, bytes], commit: str,
                     refs: tuple[str, ...] = ("main",)) -> Path:
    """CACHE/models--ORG--NAME with one blob per file, snapshots/COMMIT/FILE symlinked into blobs/ (relative
    links, as huggingface_hub makes them) and refs/REF holding COMMIT; returns the snapshot folder."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    for name, data in files.items():
        blob = folder / "blobs" / blob_name(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str
    branches: tuple[str, ...] = ("main",)


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    stall: str | None = None  # a file whose first GET hangs halfway
    url: str = ""  # set by Served
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range header)
    stalled: threading.Event = field(default_factory=threading.Event)  # set once the half is sent
    released: threading.Event = field(default_factory=threading.Event)

    def requested(self, method: str, fragment: str) -> list[tuple[str, str, str | None]]:
        return [entry for entry in self.log if entry[0] == method and fragment in entry[1]]

    def release(self) -> None:
        self.released.set()


MODEL_INFO = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)")
RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")


def handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: the test reads hub.log
            pass

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def do_GET(self) -> None:
            self.answer(body=True)

        def answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.log.append((self.command, path, self.headers.get("Range")))
            if len(hub.log) > MAX_REQUESTS:
                return self.error(500, None)
            if m := MODEL_INFO.fullmatch(path):
                return self.model_info(m["repo"], m["rev"])
            if m := RESOLVE.fullmatch(path):
                return self.resolve(m["repo"], m["rev"], m["file"], body)
            self.error(404, None)

        def lookup(self, repo_id: str, rev: str) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self.error(404, "RepoNotFound")
            elif rev not in (*repo.branches, repo.commit):
                self.error(404, "RevisionNotFound")
            else:
                return repo
            return None

        def model_info(self, repo_id: str, rev: str) -> None:
            if (repo := self.lookup(repo_id, rev)) is None:
                return
            siblings = [{"rfilename": name, "size": len(data)} for name, data in repo.files.items()]
            data = json.dumps({"id": repo_id, "sha": repo.commit, "siblings": siblings}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def resolve(self, repo_id: str, rev: str, file: str, body: bool) -> None:
            if (repo := self.lookup(repo_id, rev)) is None:
                return
            if file not in repo.files:
                return self.error(404, "EntryNotFound")
            data = repo.files[file]
            start = int(m[1]) if (m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")) else 0
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{blob_name(data)}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            if file == hub.stall and not hub.stalled.is_set():
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()
                hub.stalled.set()
                hub.released.wait(30)  # bounded: the connection is dropped after this at the latest
                self.close_connection = True
                return
            self.wfile.write(data[start:])

        def error(self, status: int, code: str | None) -> None:
            data = json.dumps({"error": code or "not found"}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler


class Served:
    """The fake Hub on 127.0.0.1, on a free port, in a daemon thread; `close` shuts it down and joins it."""

    def __init__(self, hub: FakeHub):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(hub))
        self.server.daemon_threads = True
        self.url = hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
