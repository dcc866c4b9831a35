"""`glm4v download` run as a real process with the real huggingface_hub against a fake Hub on 127.0.0.1
(hub_helpers.FakeHub): the files land in the cache layout glm4v_core.hub reads, pickles are not asked for
without --allow-pickle, and a download cut short by Ctrl-C resumes from its partial file."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.paths import FIXTURES
from hub_helpers import FakeHub, FakeRepo, Served, blob_name

import glm4v_core
from glm4v_core import download_cli
from glm4v_core.download import INSTALL, select_files
from glm4v_core.hub import HubError, resolve_hub_id

pytest.importorskip("huggingface_hub")

COMMIT = "c0ffee" + "0" * 34
BIG_FILE = "big.dat"  # the file the resume test cuts short


def tiny_repo() -> FakeRepo:
    names = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors"]
    files = {name: (FIXTURES / "tiny" / name).read_bytes() for name in names}
    files["pytorch_model.bin"] = b"\x80\x04pickled weights, never to be fetched by default"
    files["docs/notes.txt"] = b"a file in a subfolder\n"
    return FakeRepo(files, COMMIT, branches=("main", "dev"))


@pytest.fixture
def hub():
    """org/tiny (safetensors + a pickle) and org/pickles (pickles only), served on a free port of 127.0.0.1."""
    fake = FakeHub({"org/tiny": tiny_repo(),
                    "org/pickles": FakeRepo({"config.json": b"{}", "pytorch_model.bin": b"\x80\x04"}, "d" * 40)})
    served = Served(fake)
    yield fake
    fake.release()
    served.close()


def environment(tmp_path: Path, endpoint: str) -> dict[str, str]:
    """The process's environment: this test's cache and Hub only, no token, no proxy (nothing leaves 127.0.0.1)."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("HF_", "HUGGINGFACE_")) and "PROXY" not in k.upper()}
    env.update(HF_HUB_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=endpoint,
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DOWNLOAD_TIMEOUT="20", HF_HUB_ETAG_TIMEOUT="20", HF_HUB_DISABLE_XET="1")
    return env


def download(tmp_path: Path, endpoint: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm4v_core.cli", "download", *args], capture_output=True,
                          text=True, env=environment(tmp_path, endpoint), timeout=timeout)


def test_files_land_where_the_resolver_reads_them(hub, tmp_path, monkeypatch):
    run = download(tmp_path, hub.url, "org/tiny")
    assert run.returncode == 0, run.stderr
    repo = tmp_path / "cache" / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    assert run.stdout == f"{snapshot}\n"  # the only line on stdout: usable as --checkpoint
    assert (repo / "refs" / "main").read_text() == COMMIT
    assert "skipping 1 pickle file(s) (pytorch_model.bin)" in run.stderr
    assert not (snapshot / "pytorch_model.bin").exists() and not hub.requested("GET", "pytorch_model.bin")
    for name, data in tiny_repo().files.items():
        if name != "pytorch_model.bin":  # huggingface_hub's layout: a symlink into blobs/, named by its ETag
            assert (snapshot / name).is_symlink() and (snapshot / name).resolve() == repo / "blobs" / blob_name(data)
            assert (snapshot / name).read_bytes() == data
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert resolve_hub_id("org/tiny") == snapshot
    assert glm4v_core.load_model("org/tiny").config == glm4v_core.load_model(FIXTURES / "tiny").config
    # again: everything is cached, no file is asked for (only the listing, for the branch's commit)
    gets = len(hub.requested("GET", "/resolve/"))
    again = download(tmp_path, hub.url, "org/tiny")
    assert again.returncode == 0 and again.stdout == run.stdout and len(hub.requested("GET", "/resolve/")) == gets


def test_a_branch_include_patterns_and_allow_pickle(hub, tmp_path):
    run = download(tmp_path, hub.url, "org/tiny@dev", "--include", "*.bin", "--include", "docs/", "--allow-pickle")
    assert run.returncode == 0, run.stderr
    snapshot = tmp_path / "cache" / "models--org--tiny" / "snapshots" / COMMIT
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == \
        ["docs/notes.txt", "pytorch_model.bin"]
    assert (snapshot.parent.parent / "refs" / "dev").read_text() == COMMIT
    assert not (snapshot.parent.parent / "refs" / "main").exists()
    assert hub.requested("GET", "/api/models/org/tiny/revision/dev")


def test_a_repo_of_pickles_only_is_refused_in_one_line(hub, tmp_path):
    run = download(tmp_path, hub.url, "org/pickles")
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == ("glm4v download: error: org/pickles has only pickled weights (pytorch_model.bin) and no "
                          ".safetensors; glm4v-core loads safetensors only (--allow-pickle fetches the pickles "
                          "anyway)\n")
    assert not hub.requested("HEAD", "/resolve/") and not hub.requested("GET", "/resolve/")


def test_a_download_cut_short_by_ctrl_c_resumes(tmp_path):
    """huggingface_hub writes in 10 MiB pieces: a 24 MiB file stalled halfway leaves a partial file to resume."""
    data = bytes(range(256)) * (24 * 4096)
    fake = FakeHub({"org/big": FakeRepo({"config.json": b"{}", BIG_FILE: data}, COMMIT)}, stall=BIG_FILE)
    served = Served(fake)
    repo = tmp_path / "cache" / "models--org--big"
    partial = repo / "blobs" / f"{blob_name(data)}.incomplete"
    try:
        proc = subprocess.Popen([sys.executable, "-m", "glm4v_core.cli", "download", "org/big"], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(tmp_path, served.url))
        assert fake.stalled.wait(30), "the download never reached the file that stalls"
        deadline = time.monotonic() + 30
        while not (partial.exists() and partial.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # Ctrl-C, mid-file
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert err.strip().splitlines()[-1] == "glm4v download: interrupted; run the same command again to resume"
        assert "Traceback" not in err and out == ""
        kept = partial.stat().st_size
        assert 0 < kept < len(data) and partial.read_bytes() == data[:kept]
        assert not (repo / "refs" / "main").exists()  # the branch is not moved onto a half-filled snapshot
        fake.release()
        run = download(tmp_path, served.url, "org/big")
        assert run.returncode == 0, run.stderr
        assert fake.requested("GET", BIG_FILE)[-1][2] == f"bytes={kept}-"  # only the rest was asked for
        assert (repo / "snapshots" / COMMIT / BIG_FILE).read_bytes() == data and not partial.exists()
        assert (repo / "refs" / "main").read_text() == COMMIT
    finally:
        fake.release()
        served.close()


def test_missing_repo_revision_and_an_unreachable_hub_are_one_line_errors(hub, tmp_path):
    run = download(tmp_path, hub.url, "org/absent")
    assert run.returncode == 1
    assert run.stderr == f"glm4v download: error: org/absent was not found on {hub.url} (a typo, or a private " \
                         "repo: log in with `hf auth login` or set HF_TOKEN)\n"
    run = download(tmp_path, hub.url, "org/tiny", "--revision", "v9")
    assert run.returncode == 1
    assert run.stderr.startswith("glm4v download: error: org/tiny has no revision 'v9' on") and \
        run.stderr.count("\n") == 1
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    run = download(tmp_path, closed, "org/tiny")
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"glm4v download: error: org/tiny: the download from {closed} failed (")


@pytest.mark.parametrize("argv, message", [
    (["tiny"], "expected a Hub model id such as THUDM/glm-4v-9b"),
    (["org/tiny@"], "expected a Hub model id"),
    (["org/tiny@../x"], "expected a Hub model id"),
    (["org/tiny@a", "--revision", "b"], "two revisions: 'a' after '@' and --revision 'b'"),
    (["org/tiny", "--revision", "../x"], "argument --revision: expected a branch, tag or commit hash"),
])
def test_usage_errors_exit_2_before_any_request(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        download_cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_without_huggingface_hub_the_extra_is_named(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` raises ImportError
    assert download_cli.main(["org/tiny"]) == 1
    err = capsys.readouterr().err
    assert err == f"glm4v download: error: glm4v download needs huggingface_hub, which is not installed: {INSTALL}\n"


def test_an_include_leaves_a_ref_on_the_commit_it_names(hub, tmp_path):
    """Fetching part of a commit (--include) does not move a branch off a snapshot that was fetched whole."""
    refs = tmp_path / "cache" / "models--org--tiny" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("e" * 40)
    run = download(tmp_path, hub.url, "org/tiny", "--include", "*.json")
    assert run.returncode == 0, run.stderr
    assert (refs / "main").read_text() == "e" * 40
    assert f"refs/main stays at eeeeeeeeeeee: --include fetched part of {COMMIT[:12]} only" in run.stderr


def test_an_unchanged_ref_is_not_written_again(tmp_path, monkeypatch):
    """A shared cache whose refs/ cannot be written stays usable once it holds the commit."""
    from glm4v_core import download as dl
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "main").write_text(COMMIT + "\n")

    def refuse(*_):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(dl.os, "replace", refuse)
    dl._write_ref(tmp_path, "main", COMMIT)
    with pytest.raises(PermissionError):
        dl._write_ref(tmp_path, "main", "f" * 40)


def test_every_other_failure_of_huggingface_hub_is_one_line():
    """hf_transfer / Xet backends raise plain ValueError and RuntimeError: a HubError, not a traceback."""
    from glm4v_core.download import _import_huggingface_hub, hub_failures
    from glm4v_core.hub import HubId
    huggingface_hub = _import_huggingface_hub()
    for error in (RuntimeError("xet: connection reset"), ValueError("Fast download using 'hf_transfer' is enabled")):
        with pytest.raises(HubError, match=rf"^org/x: big.dat: {re.escape(str(error))}$"):
            with hub_failures(huggingface_hub, HubId("org/x"), "big.dat"):
                raise error
    with pytest.raises(HubError, match="^ours$"):
        with hub_failures(huggingface_hub, HubId("org/x")):
            raise HubError("ours")


def test_file_selection():
    names = ["config.json", "model.safetensors", "pytorch_model.bin", "sub/a.PT", "sub/b.txt"]
    assert select_files(names, [], False, "r") == (["config.json", "model.safetensors", "sub/b.txt"],
                                                   ["pytorch_model.bin", "sub/a.PT"])
    assert select_files(names, [], True, "r") == (names, [])
    assert select_files(names, ["sub/"], False, "r") == (["sub/b.txt"], ["sub/a.PT"])
    with pytest.raises(HubError, match=r"--include \*.gguf matches none of the 5 files of r \(config.json, "):
        select_files(names, ["*.gguf"], False, "r")
    with pytest.raises(HubError, match=r"--include \*.bin selects only pickle files of r \(pytorch_model.bin\)"):
        select_files(names, ["*.bin"], False, "r")
    with pytest.raises(HubError, match="r has only pickled weights"):
        select_files(["config.json", "model.ckpt"], [], False, "r")
    assert select_files(["a.pth.tar", "b.joblib", "c.pkl.gz", "d.pt.gz", "m.SAFETENSORS"], [], False, "r") == \
        (["m.SAFETENSORS"], ["a.pth.tar", "b.joblib", "c.pkl.gz", "d.pt.gz"])
