"""Hub ids (`ORG/NAME[@REVISION]`) resolved from a Hugging Face cache built in a temp folder, laid out as
huggingface_hub lays it out (blobs, symlinked snapshots, refs), with no network and no huggingface_hub."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURES
from hub_helpers import make_cached_repo

import glm4v_core
from glm4v_core import cli
from glm4v_core.checkpoint import resolve_checkpoint
from glm4v_core.hub import (
    HubError,
    HubId,
    cache_location,
    parse_hub_id,
    repo_id_of,
    resolve_hub_id,
    resolve_model_folder,
)
from glm4v_core.parity import cli as parity_cli

MAIN, DEV, OLD = "1" * 40, "2" * 40, "2" * 8 + "3" * 32  # DEV and OLD share their first 8 hex digits
HF_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


def tiny_files(config_extra: bytes = b"") -> dict[str, bytes]:
    """The tiny fixture's loadable files (a real checkpoint, as a Hub repo would hold it)."""
    names = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors"]
    files = {name: (FIXTURES / "tiny" / name).read_bytes() for name in names}
    files["config.json"] += config_extra  # trailing whitespace: another blob, the same config
    return files


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """HF_HUB_CACHE -> a temp cache holding org/tiny: main and v1 at MAIN, dev at DEV, plus an unnamed OLD commit."""
    for variable in HF_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    make_cached_repo(cache, "org/tiny", tiny_files(), MAIN, refs=("main", "v1"))
    make_cached_repo(cache, "org/tiny", tiny_files(b"\n"), DEV, refs=("dev", "refs/pr/1"))
    make_cached_repo(cache, "org/tiny", {"config.json": b"{}"}, OLD, refs=())
    monkeypatch.chdir(tmp_path)  # no local folder named org/tiny
    return cache


def snapshot(cache: Path, commit: str) -> Path:
    return cache / "models--org--tiny" / "snapshots" / commit


@pytest.mark.parametrize("text, want", [
    ("org/tiny", HubId("org/tiny", "main")), ("THUDM/glm-4v-9b@v1.0", HubId("THUDM/glm-4v-9b", "v1.0")),
    ("org/tiny@refs/pr/1", HubId("org/tiny", "refs/pr/1")), (f"a_b/c.d@{MAIN}", HubId("a_b/c.d", MAIN)),
    ("tiny", None), ("/abs/path", None), ("./org/tiny", None), ("a/b/c", None), ("org/-x", None),
    ("org/x.", None), ("org/a--b", None), ("org/a..b", None), ("org/na me", None), ("~/models", None),
])
def test_what_reads_as_a_hub_id(text, want):
    assert parse_hub_id(text) == want


@pytest.mark.parametrize("text", ["org/tiny@", "org/tiny@../../etc", "org/tiny@refs//main", "org/tiny@a\\b",
                                  "org/tiny@D:/x", "org/tiny@main\n", "org/tiny@ main", "org/tiny@a\x7fb"])
def test_a_revision_that_cannot_name_a_ref_is_refused(text):
    with pytest.raises(HubError, match="is not a revision name"):
        parse_hub_id(text)


def test_branches_tags_pr_refs_and_commits_resolve_to_their_snapshot(cache):
    assert resolve_hub_id("org/tiny") == snapshot(cache, MAIN)  # refs/main
    assert resolve_hub_id("org/tiny@v1") == snapshot(cache, MAIN)
    assert resolve_hub_id("org/tiny@dev") == snapshot(cache, DEV)  # the second branch: another commit
    assert resolve_hub_id("org/tiny@refs/pr/1") == snapshot(cache, DEV)
    assert resolve_hub_id(f"org/tiny@{OLD}") == snapshot(cache, OLD)  # a commit with no ref: its snapshot
    assert resolve_hub_id(f"org/tiny@{OLD[:9]}") == snapshot(cache, OLD)  # a unique prefix
    assert resolve_hub_id(f"org/tiny@{MAIN[:7].upper()}") == snapshot(cache, MAIN)
    # what the snapshot holds: symlinks into blobs/, with the bytes of the files
    config = snapshot(cache, DEV) / "config.json"
    assert config.is_symlink() and config.resolve().parent == cache / "models--org--tiny" / "blobs"
    assert config.read_bytes() == (FIXTURES / "tiny" / "config.json").read_bytes() + b"\n"


def test_an_ambiguous_commit_prefix_is_named(cache):
    with pytest.raises(HubError, match=re.escape("start of several cached commits (222222222222, 222222223333)")) as e:
        resolve_hub_id("org/tiny@2222222")
    assert "\n" not in str(e.value)


def test_a_missing_repo_names_the_cache_and_the_download(cache):
    with pytest.raises(HubError) as e:
        resolve_hub_id("org/absent@v2", "--checkpoint")
    message = str(e.value)
    assert message.startswith("--checkpoint org/absent@v2: no such folder here, and org/absent is not in the")
    assert str(cache / "models--org--absent") in message and "$HF_HUB_CACHE" in message
    assert message.endswith("glm4v download org/absent@v2") and "\n" not in message


def test_a_missing_revision_lists_what_is_cached(cache):
    with pytest.raises(HubError) as e:
        resolve_hub_id("org/tiny@nope")
    message = str(e.value)
    assert "revision 'nope' is not in the Hugging Face cache" in message
    assert "branches/tags: dev, main, refs/pr/1, v1" in message
    assert "commits: 111111111111, 222222222222, 222222223333" in message
    assert message.endswith("glm4v download org/tiny@nope") and "\n" not in message
    with pytest.raises(HubError, match="is not in the Hugging Face cache"):
        resolve_hub_id("org/tiny@" + "4" * 40)  # a full hash that was never fetched


def test_a_hub_id_built_by_hand_is_checked_as_text_is(cache):
    with pytest.raises(HubError, match="is not a revision name"):
        resolve_hub_id(HubId("org/tiny", "../../etc"))
    with pytest.raises(HubError, match="is not a hub id"):
        resolve_hub_id(HubId("../tiny", "main"))
    assert resolve_hub_id(HubId("org/tiny", "dev")) == snapshot(cache, DEV)


def test_a_snapshot_missing_a_shard_of_its_index_is_named_not_returned(cache):
    """A commit has no ref that is written last: a cut-short `glm4v download org/x@<commit>` leaves it part-filled."""
    (snapshot(cache, DEV) / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(HubError, match=rf"{DEV} lacks model-00002-of-00002.safetensors of the shards its "
                                       r"model.safetensors.index.json names .*glm4v download org/tiny@dev"):
        resolve_hub_id("org/tiny@dev")
    assert resolve_hub_id("org/tiny") == snapshot(cache, MAIN)  # its own blobs: untouched


def test_a_ref_whose_snapshot_is_gone_or_garbled(cache):
    refs = cache / "models--org--tiny" / "refs"
    (refs / "gone").write_text("5" * 40)
    with pytest.raises(HubError, match=r"refs/gone points at commit 5{40}, but its snapshot folder is missing"):
        resolve_hub_id("org/tiny@gone")
    (refs / "garbled").write_text("not a hash\n")
    with pytest.raises(HubError, match="should hold a 40-hex commit hash, holds 'not a hash'"):
        resolve_hub_id("org/tiny@garbled")


def test_the_cache_location_follows_huggingface_hub(tmp_path, monkeypatch):
    for variable in HF_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_location() == (tmp_path / "home" / ".cache" / "huggingface" / "hub", "the default")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_location()[0] == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", "~/hf-home")  # ~ expands, as huggingface_hub expands it
    assert cache_location() == (tmp_path / "home" / "hf-home" / "hub", "$HF_HOME/hub")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert cache_location()[0] == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert cache_location() == (tmp_path / "hub-cache", "$HF_HUB_CACHE")


@pytest.mark.parametrize("setting", ["HF_HUB_CACHE", "HF_HOME", "HOME"])
def test_each_setting_finds_its_cache(tmp_path, monkeypatch, setting):
    for variable in HF_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    where = {"HF_HUB_CACHE": tmp_path / "c", "HF_HOME": tmp_path / "h" / "hub",
             "HOME": tmp_path / "home" / ".cache" / "huggingface" / "hub"}[setting]
    if setting != "HOME":
        monkeypatch.setenv(setting, str(where if setting == "HF_HUB_CACHE" else where.parent))
    make_cached_repo(where, "org/tiny", {"config.json": b"{}"}, MAIN)
    assert resolve_hub_id("org/tiny") == where / "models--org--tiny" / "snapshots" / MAIN


def test_a_local_folder_of_that_name_wins(cache, tmp_path):
    assert resolve_model_folder("org/tiny") == snapshot(cache, MAIN)
    local = tmp_path / "org" / "tiny"
    local.mkdir(parents=True)
    assert resolve_model_folder("org/tiny") == Path("org/tiny")  # the cwd's folder, as transformers does
    with pytest.raises(HubError, match="no such folder here"):
        resolve_model_folder(Path("no/such"))  # a hub id found nowhere: the error says both
    assert resolve_model_folder(tmp_path / "missing") == tmp_path / "missing"  # a path: the caller's checks


def test_repo_id_of_a_snapshot_folder(cache, tmp_path):
    assert repo_id_of(snapshot(cache, MAIN)) == "org/tiny"  # `glm4v serve`'s default model name
    assert repo_id_of(FIXTURES / "tiny") is None and repo_id_of(tmp_path / "snapshots" / MAIN) is None


def test_load_model_takes_a_hub_id(cache):
    model = glm4v_core.load_model("org/tiny@dev")
    want = glm4v_core.load_model(FIXTURES / "tiny")
    assert model.config == want.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values(),
                                                    strict=True))
    with pytest.raises(glm4v_core.HubError, match="org/tiny@nope: revision 'nope'"):
        glm4v_core.load_model("org/tiny@nope")


def test_resolve_checkpoint_names_a_snapshot_without_config(cache):
    assert resolve_checkpoint(Path("org/tiny")) == snapshot(cache, MAIN)
    (snapshot(cache, MAIN) / "config.json").unlink()
    with pytest.raises(glm4v_core.CLIError, match=r"no config.json in it\) \(the cached snapshot of org/tiny"):
        resolve_checkpoint(Path("org/tiny"))


def test_generate_with_a_hub_checkpoint(cache, capsys):
    argv = ["generate", "--max-new-tokens", "4", "--device", "cpu", "Hello"]
    assert cli.main(["generate", "--checkpoint", "org/tiny", *argv[1:]]) == 0
    from_hub = capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", str(FIXTURES / "tiny"), *argv[1:]]) == 0
    assert from_hub.out == capsys.readouterr().out and from_hub.out.strip()


def test_parity_with_a_hub_checkpoint_compares_the_snapshot(cache, capsys, monkeypatch):
    """glm4v parity resolves --checkpoint itself: the snapshot's config and reference are checked for real, and the
    comparison (replaced here: it is parity's own tests' subject) is handed the snapshot folder."""
    files = {p.name: p.read_bytes() for p in (FIXTURES / "tiny").iterdir()}
    folder = make_cached_repo(cache, "org/full", files, MAIN)
    seen = []
    monkeypatch.setattr(parity_cli, "run_parity", lambda checkpoint, reference, *a, **k: seen.append(
        (checkpoint, reference)) or [])
    monkeypatch.setattr(parity_cli, "run_multi_image_parity", lambda checkpoint, **k: seen.append(checkpoint) or [])
    assert cli.main(["parity", "--checkpoint", "org/full"]) == 0, capsys.readouterr().err
    assert seen == [(folder, folder / "reference.safetensors"), folder]
    assert capsys.readouterr().out.startswith(f"glm4v-core parity: {folder} vs {folder / 'reference.safetensors'}")


def test_a_missing_hub_checkpoint_is_one_line_exit_1(cache, capsys):
    assert cli.main(["generate", "--checkpoint", "org/absent", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("glm4v: error: --checkpoint org/absent: no such folder here") and err.count("\n") == 1
    assert cli.main(["parity", "--checkpoint", "org/tiny@nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("glm4v parity: error: --checkpoint org/tiny@nope: revision 'nope'")
    assert err.count("\n") == 1


def test_the_resolver_imports_neither_torch_nor_huggingface_hub():
    code = ("import sys, glm4v_core.hub, glm4v_core.download_cli; "
            "print(sorted(m for m in ('torch', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
