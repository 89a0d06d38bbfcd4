"""A clone of this repository is all a newcomer has: nothing may point outside it, every cited file exists."""
from __future__ import annotations

import re
import subprocess

from callweaver.engine.metrics import PUBLISHED_PEER_FIGURES
from tests.fakes.live_server import REPO

OUTSIDE = ("../" + "shared", "/work/" + "shared")  # spelt in pieces so this file does not match itself
DOC_PATH = re.compile(r"\bdocs/[\w./-]+\.(?:md|png)\b")


def _tracked_text_files() -> dict[str, str]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    out = {}
    for name in names:
        path = REPO / name
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".html", ".json", ".txt", ".ini"} or name == ".ci/run":
            if path.exists():
                out[name] = path.read_text(encoding="utf-8")
    return out


def test_nothing_points_outside_the_repository():
    offenders = [name for name, text in _tracked_text_files().items() if any(o in text for o in OUTSIDE)]
    assert offenders == []


def test_every_cited_doc_exists():
    cited = {(name, path) for name, text in _tracked_text_files().items() for path in DOC_PATH.findall(text)}
    missing = sorted((name, path) for name, path in cited if not (REPO / path).exists())
    assert cited and missing == []


def test_the_api_contract_and_the_peer_sources_are_in_the_repository():
    assert (REPO / "docs" / "contract.md").exists()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "(docs/contract.md)" in readme
    for entry in PUBLISHED_PEER_FIGURES:
        path = DOC_PATH.search(entry["source"])
        assert path and (REPO / path.group(0)).exists(), entry


def test_the_readme_simulator_example_uses_files_in_the_repository():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    paths = re.findall(r"--(?:workflow|script) (\S+)", readme)
    assert paths and all((REPO / p).is_file() for p in paths), paths
