"""`glm4v download`: fetch a checkpoint from the Hugging Face Hub into the local Hugging Face cache.

    glm4v download ORG/NAME[@REVISION] [--revision R] [--include PATTERN ...] [--allow-pickle]

The snapshot folder is printed on stdout at the end (the only line there: `CKPT=$(glm4v download ...)`);
`--checkpoint ORG/NAME[@REVISION]` finds it again without any network. Needs huggingface_hub (the
[download] extra); torch is not imported.
"""
from __future__ import annotations

import argparse
import sys

from glm4v_conversion import __version__
from glm4v_core.download import PICKLE_PATTERNS, download_snapshot
from glm4v_core.errors import REFUSED
from glm4v_core.hub import DEFAULT_REVISION, parse_hub_id

PROG = "glm4v download"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Fetch a Hub model repo into the local Hugging Face cache (huggingface_hub's layout, where "
                    "--checkpoint ORG/NAME[@REVISION] then finds it offline); a cut-short download resumes when run "
                    "again. Prints the snapshot folder.",
        epilog="exit status: 0 fetched, 1 a refused input or a failure (one line), 2 a usage error, 130 Ctrl-C "
               "(run it again to resume). The cache: $HF_HUB_CACHE (or $HUGGINGFACE_HUB_CACHE), else $HF_HOME/hub, "
               "else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub (an empty variable counts as "
               "unset); the Hub: $HF_ENDPOINT; a token: HF_TOKEN or `hf auth login`.")
    p.add_argument("repo", metavar="ORG/NAME[@REVISION]", help="the model repo, e.g. THUDM/glm-4v-9b")
    p.add_argument("--revision", default=None,
                   help=f"branch, tag or commit hash (default: the one after '@', else {DEFAULT_REVISION})")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="fetch only the files matching this fnmatch pattern ('*.json', 'subdir/'); repeat for "
                        "several (default: every file)")
    p.add_argument("--allow-pickle", action="store_true",
                   help=f"also fetch pickled files ({', '.join(PICKLE_PATTERNS)}), skipped by default: loading "
                        "them can run code, and glm4v-core reads safetensors only")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    repo, at, revision = args.repo.partition("@")
    if parse_hub_id(repo) is None or (at and not _plain(revision)):
        parser.error(f"argument ORG/NAME[@REVISION]: expected a Hub model id such as THUDM/glm-4v-9b or "
                     f"THUDM/glm-4v-9b@main, got {args.repo!r}")
    if args.revision is not None and not _plain(args.revision):
        parser.error(f"argument --revision: expected a branch, tag or commit hash, got {args.revision!r}")
    if at and args.revision is not None and args.revision != revision:
        parser.error(f"two revisions: {revision!r} after '@' and --revision {args.revision!r}; give one")
    revision = args.revision or revision or DEFAULT_REVISION
    try:
        snapshot = download_snapshot(repo, revision, args.include, args.allow_pickle)
    except REFUSED as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(snapshot, flush=True)
    return 0


def _plain(revision: str) -> bool:
    try:
        return parse_hub_id(f"a/b@{revision}") is not None
    except REFUSED:
        return False


if __name__ == "__main__":
    sys.exit(main())
