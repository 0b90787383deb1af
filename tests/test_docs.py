"""The documentation (README.md, docs/, recipes/*/README.md) covers what the package registers, and its links resolve."""
import dataclasses
import glob
import importlib
import os
import pkgutil
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted([os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True),
                *glob.glob(os.path.join(REPO, "recipes", "*", "README.md"))])
PAGES = [p for p in PAGES if os.sep + "_incoming" + os.sep not in p]  # helpers' drafts, folded in by hand


def docs_text() -> str:
    return "\n".join(open(p, encoding="utf-8").read() for p in PAGES)


def argparse_options() -> set:
    """Every ``--option`` the package's own code adds to an argparse parser (commands, tasks, models)."""
    options = set()
    for path in glob.glob(os.path.join(REPO, "fairseq_pdd", "**", "*.py"), recursive=True):
        options |= set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", open(path, encoding="utf-8").read()))
    return options


def dataclass_options() -> set:
    """Every ``--option`` of the fairseq dataclasses (criteria, tasks) the package defines: the fields each
    class declares itself, not those it inherits from fairseq's configs."""
    import fairseq  # noqa: F401
    from fairseq.dataclass import FairseqDataclass

    import fairseq_pdd

    options = set()
    for info in pkgutil.walk_packages(fairseq_pdd.__path__, "fairseq_pdd."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and issubclass(obj, FairseqDataclass)
                    and obj.__module__ == module.__name__):
                options |= {"--" + name.replace("_", "-") for name in obj.__dict__.get("__annotations__", {})}
    return options


def test_every_registered_option_is_documented():
    text = docs_text()
    options = argparse_options() | dataclass_options()
    assert len(options) > 50
    missing = sorted(o for o in options if not re.search(re.escape(o) + r"(?![\w-])", text))
    assert not missing, f"options documented nowhere in README.md, docs/ or recipes/*/README.md: {missing}"


def test_every_console_script_is_documented():
    scripts = re.findall(r'"(fairseq-pdd-[\w-]+) = ', open(os.path.join(REPO, "setup.py")).read())
    assert len(scripts) >= 10
    text = docs_text()
    assert not [s for s in scripts if s not in text]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(page):
    """Every relative link and image of a page points to an existing file (and #anchor to a heading there)."""
    text = open(page, encoding="utf-8").read()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s)://, mailto:
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(resolved):
            broken.append(target)
        elif anchor and resolved.endswith(".md") and anchor not in headings(resolved):
            broken.append(target)
    assert not broken, broken


def headings(page: str) -> set:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    text = re.sub(r"^```.*?^```", "", open(page, encoding="utf-8").read(), flags=re.M | re.S)  # code comments
    for title in re.findall(r"^#+ (.+)$", text, flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-"))
    return anchors
