"""Every ```python block of README.md and docs/*.md runs as written.

Blocks are numbered per page from 1 (test ids such as ``docs/formats.md:2``) and each runs on
its own, in a fresh namespace, from a temporary working directory. A block that cannot run
in the test suite (it needs a GPU, a long training, a shell) is fenced ```bash or ```text
instead; no ```python block is ever skipped.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# The pages that explain an API, each of which must show it in at least one tested example.
PAGES_WITH_EXAMPLES = [
    "README.md",
    "docs/formats.md",
    "docs/recipes.md",
    "docs/lightning.md",
    "docs/compat.md",
    "docs/design.md",
]
# Fences the docs may use: python is run; the others are shown only.
LANGUAGES = {"python", "bash", "text", "yaml"}

FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _name(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _fences(page: pathlib.Path) -> list[tuple[str, str]]:
    return FENCE.findall(page.read_text(encoding="utf-8"))


BLOCKS = [
    (f"{_name(page)}:{number}", code)
    for page in PAGES
    for number, code in enumerate((code for lang, code in _fences(page) if lang == "python"), start=1)
]


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES)
def test_page_has_examples(page):
    path = ROOT / page
    assert path.is_file(), f"{page} is missing"
    assert any(lang == "python" for lang, _ in _fences(path)), f"{page} has no ```python example"


@pytest.mark.parametrize("page", [_name(p) for p in PAGES])
def test_every_code_block_says_its_language(page):
    """An unlabelled fence (or ```py, ```python3) would escape the tests unnoticed."""
    languages = [lang for lang, _ in _fences(ROOT / page)]
    unknown = [lang or "(none)" for lang in languages if lang not in LANGUAGES]
    assert not unknown, f"{page}: code blocks fenced as {unknown}; use one of {sorted(LANGUAGES)}"


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[block_id for block_id, _ in BLOCKS])
def test_doc_example_runs(code, request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files (logs, checkpoints) write them here
    block_id = request.node.callspec.id
    exec(compile(code, block_id, "exec"), {"__name__": "__docs__"})
