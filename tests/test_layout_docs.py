"""The README's layout and docs/architecture.md describe the tree as it is: every module is named."""
from __future__ import annotations

import re

from tests.fakes.live_server import REPO


def _layout_block() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Layout"):]
    return section[section.index("```") + 3:section.index("```", section.index("```") + 3)]


def test_readme_layout_names_every_module_and_package_of_callweaver():
    layout = _layout_block()
    named = set(re.findall(r"[\w.]+(?:\.py|/)", layout))
    package = REPO / "callweaver"
    missing = []
    for path in sorted(package.iterdir()):
        if path.name.startswith(("_", ".")) and path.name != "__init__.py":
            continue
        name = path.name + "/" if path.is_dir() else path.name
        if (path.is_dir() or path.suffix == ".py") and name not in named:
            missing.append(name)
    for path in sorted((package / "engine").iterdir()):
        if path.name.startswith("_"):
            continue
        name = path.name + "/" if path.is_dir() else path.name
        if (path.is_dir() or path.suffix == ".py") and name not in named:
            missing.append("engine/" + name)
    for path in sorted((package / "engine" / "workflow").glob("*.py")):
        if not path.name.startswith("_") and path.name not in layout:
            missing.append("engine/workflow/" + path.name)
    assert missing == []


def test_architecture_doc_draws_a_call_through_modules_that_exist():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert "```mermaid" in text
    cited = set(re.findall(r"\b((?:routes|engine|store|engine/workflow)/[\w/]*\w(?:\.py)?|\w+\.py)\b", text))
    assert "engine/workflow/parse.py" in cited and "routes/twiml.py" in cited
    for name in cited:
        candidates = [REPO / "callweaver" / name, REPO / "callweaver" / "engine" / name, REPO / "tests" / name]
        assert any(p.exists() for p in candidates), name
