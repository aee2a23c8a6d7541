"""The method documents (docs/methods/) and every reference to them in the code, tests and configs.

- Every reference ``docs/methods/<file>.md §N`` (and a bare ``<file>.md §N`` where bare ones are still
  allowed: tests, configs, suites, the README, docs/*.md, the documents themselves) names an existing
  file and an existing numbered section of it; ranges (``§1-4``, ``§2.2-2.4``) and lists (``§1-2, §5``)
  are checked section by section.
- No bare method-document reference is left in ``src/`` or ``benchmarks/``: users only have the
  repository, so the docstrings cite ``docs/methods/<file>.md``.
- Headings follow the convention of docs/methods/README.md: ``## §N Title``, ``### §N.M Title``.
- docs/methods/README.md lists every document, and every test a document names exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "methods"
INDEX = DOCS / "README.md"

# The documents the code cites (once specifications outside the repository, now under docs/methods/).
DOCUMENTS = ("eql", "gala", "bgp", "gbg", "baselines", "protocol", "design")
PREFIX = "docs/methods/"

SECTION = r"\d+(?:\.\d+)*"
_ONE = rf"§(?P<a>{SECTION})(?:\s*[-–]\s*§?(?P<b>{SECTION}))?"
REFERENCE = re.compile(
    r"(?<![\w./-])(?P<prefix>docs/methods/)?(?P<name>[a-z_]+)\.md\b"
    rf"(?P<sections>\s+§{SECTION}(?:\s*[-–]\s*§?{SECTION})?(?:\s*,\s*§{SECTION}(?:\s*[-–]\s*§?{SECTION})?)*)?"
    r'(?:,\s*"(?P<title>[^"\n]+)")?'
)
HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<text>.*?)\s*$")
NUMBERED = re.compile(rf"^§(?P<number>{SECTION}) \S")
TEST_NAME = re.compile(r"`(?:tests/(?P<file>test_\w+\.py)::)?(?P<name>test_\w+)`")
TEST_FILE = re.compile(r"tests/(?P<file>test_\w+\.py)")

# Where references are looked for; bare ones are errors under these two.
SCANNED = {"src": "*.py", "benchmarks": "*.py", "tests": "*.py", "configs": "*.yaml", "suites": "*.yaml"}
PREFIX_REQUIRED = ("src", "benchmarks")


@dataclass(frozen=True)
class Reference:
    where: str  # "path:line"
    name: str  # document name without ".md"
    prefixed: bool
    sections: tuple[str, ...]  # every section number the reference covers
    title: str | None  # a quoted section title (``design.md, "Pieces and their interfaces"``)

    def __str__(self) -> str:
        shown = f"{PREFIX if self.prefixed else ''}{self.name}.md"
        if self.sections:
            shown += " §" + ", §".join(self.sections)
        return f"{self.where}: {shown}"


# ----------------------------------------------------------------------------------- parsing helpers
def _expand(a: str, b: str | None) -> list[str]:
    """§a or the range §a-b: integer ranges and ranges of the last component (2.2-2.4) are enumerated."""
    if b is None:
        return [a]
    pa, pb = a.split("."), b.split(".")
    if len(pb) == 1 and len(pa) > 1:  # "§2.2-4" means 2.2-2.4
        pb = [*pa[:-1], pb[0]]
    if len(pa) == len(pb) and pa[:-1] == pb[:-1] and int(pa[-1]) <= int(pb[-1]):
        head = ".".join(pa[:-1])
        return [f"{head}.{i}" if head else str(i) for i in range(int(pa[-1]), int(pb[-1]) + 1)]
    return [a, ".".join(pb)]


def find_references(text: str, where: str, names: Iterable[str] = DOCUMENTS) -> Iterator[Reference]:
    """References to method documents in ``text``: prefixed ones to any file, bare ones to ``names``."""
    known = set(names)
    for lineno, line in enumerate(text.splitlines(), start=1):
        for m in REFERENCE.finditer(line):
            prefixed = m.group("prefix") is not None
            if not prefixed and m.group("name") not in known:
                continue  # README.md, report.md, ...: not a method document
            sections: list[str] = []
            for s in re.finditer(_ONE, m.group("sections") or ""):
                sections += _expand(s.group("a"), s.group("b"))
            title = m.group("title") if not sections else None
            yield Reference(f"{where}:{lineno}", m.group("name"), prefixed, tuple(sections), title)


def parse_headings(text: str) -> tuple[list[str], dict[str, str]]:
    """(convention errors, {section number: title}) of one document; fenced code blocks are skipped."""
    errors: list[str] = []
    sections: dict[str, str] = {}
    parents: dict[int, str] = {}  # heading level -> number of the latest numbered heading at that level
    fenced = False
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        errors.append("line 1: a document starts with its '# Title'")
    for lineno, line in enumerate(lines, start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = HEADING.match(line)
        if fenced or not m:
            continue
        level, heading = len(m.group("hashes")), m.group("text")
        if level == 1:
            if lineno != 1:
                errors.append(f"line {lineno}: only the first line is a '# ' heading")
            continue
        n = NUMBERED.match(heading)
        if n is None:
            errors.append(f"line {lineno}: {line!r} does not start with its section number (§N Title)")
            continue
        number = n.group("number")
        parts = number.split(".")
        if len(parts) != level - 1:
            errors.append(
                f"line {lineno}: §{number} is a level-{len(parts)} number under a level-{level} heading"
            )
        elif len(parts) > 1 and parents.get(level - 1) != ".".join(parts[:-1]):
            errors.append(f"line {lineno}: §{number} is not inside §{'.'.join(parts[:-1])}")
        if number in sections:
            errors.append(f"line {lineno}: §{number} appears twice")
        sections[number] = heading[len(number) + 2 :]
        parents[level] = number
        for deeper in [k for k in parents if k > level]:
            del parents[deeper]
    return errors, sections


def resolve(ref: Reference, documents: dict[str, dict[str, str]]) -> str | None:
    """Why ``ref`` does not resolve against ``documents`` ({name: {section: title}}), or None."""
    if ref.name not in documents:
        return f"{ref}: docs/methods/{ref.name}.md does not exist"
    missing = [s for s in ref.sections if s not in documents[ref.name]]
    if missing:
        return f"{ref}: docs/methods/{ref.name}.md has no section " + ", ".join(f"§{s}" for s in missing)
    if ref.title is not None and not any(
        ref.title.lower() in t.lower() for t in documents[ref.name].values()
    ):
        return f'{ref}: docs/methods/{ref.name}.md has no section titled "{ref.title}"'
    return None


# ----------------------------------------------------------------------------------- the repository
def _documents() -> dict[str, dict[str, str]]:
    return {p.stem: parse_headings(p.read_text(encoding="utf-8"))[1] for p in sorted(DOCS.glob("*.md"))}


def _scanned_files() -> Iterator[Path]:
    for folder, pattern in SCANNED.items():
        yield from sorted((ROOT / folder).rglob(pattern))
    yield ROOT / "README.md"
    yield from sorted(DOCS.parent.glob("*.md"))  # docs/*.md (bare references allowed there)
    yield from sorted(DOCS.glob("*.md"))


def _all_references() -> list[Reference]:
    refs: list[Reference] = []
    for path in _scanned_files():
        if path.is_file() and path.resolve() != Path(__file__).resolve():  # its self-tests break on purpose
            rel = path.relative_to(ROOT).as_posix()
            refs += find_references(path.read_text(encoding="utf-8"), rel)
    return refs


def test_every_cited_document_exists() -> None:
    missing = [name for name in DOCUMENTS if not (DOCS / f"{name}.md").is_file()]
    assert not missing, f"docs/methods/ lacks {missing}"


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_headings_follow_the_numbering_convention(path: Path) -> None:
    if path == INDEX:
        return
    errors, sections = parse_headings(path.read_text(encoding="utf-8"))
    assert not errors, f"{path.name}:\n" + "\n".join(errors)
    assert sections, f"{path.name} has no numbered section"


def test_every_reference_resolves() -> None:
    documents = _documents()
    refs = _all_references()
    assert any(r.prefixed for r in refs), "no docs/methods/ reference found at all: is the scan broken?"
    problems = [why for ref in refs if (why := resolve(ref, documents)) is not None]
    assert not problems, "references to missing documents or sections:\n" + "\n".join(problems)


def test_no_bare_references_in_src_and_benchmarks() -> None:
    bare = [
        str(r)
        for r in _all_references()
        if not r.prefixed and r.where.startswith(tuple(f"{d}/" for d in PREFIX_REQUIRED))
    ]
    assert not bare, f"cite the repository's file ({PREFIX}<name>.md), not a bare name:\n" + "\n".join(bare)


def test_index_lists_every_document() -> None:
    text = INDEX.read_text(encoding="utf-8")
    listed = re.findall(r"^- \[[^\]]+\]\(([\w.-]+\.md)\): \S", text, flags=re.MULTILINE)
    present = sorted(p.name for p in DOCS.glob("*.md") if p != INDEX)
    assert sorted(listed) == present, (
        f"docs/methods/README.md lists {sorted(listed)}, the folder has {present}"
    )
    assert len(listed) == len(set(listed)), "a document is listed twice"


def test_named_tests_exist() -> None:
    """Every test function and file a document names exists (``tests/x.py::name`` in that very file)."""
    sources = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py")}
    defined = {
        name: set(re.findall(r"^\s*def (test_\w+)\(", src, re.MULTILINE)) for name, src in sources.items()
    }
    everywhere = set().union(*defined.values())
    problems = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        problems += [
            f"{path.name}: no tests/{f}" for f in sorted(set(TEST_FILE.findall(text)) - set(sources))
        ]
        for m in TEST_NAME.finditer(text):
            file, name = m.group("file"), m.group("name")
            if file is not None and file in defined and name not in defined[file]:
                problems.append(f"{path.name}: tests/{file} defines no {name}")
            elif file is None and name not in everywhere:
                problems.append(f"{path.name}: no test function {name}")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------- the checker itself
def test_the_checker_catches_broken_and_bare_references() -> None:
    documents = {
        "eql": {"1": "Shared", "2": "Sigmoid", "3": "EFL", "4": "Softmax"},
        "design": {"2": "Pieces and X"},
    }
    text = (
        "see docs/methods/eql.md §1-4 and eql.md §2, §3; hashlib.md5 and report.md are not references\n"
        'docs/methods/eql.md §5, docs/methods/nope.md §1, eql.md §2.1-2.3, design.md, "Pieces"\n'
        'design.md, "Missing title"\n'
    )
    refs = list(find_references(text, "x.py"))
    assert [(r.name, r.prefixed, r.sections) for r in refs[:2]] == [
        ("eql", True, ("1", "2", "3", "4")),
        ("eql", False, ("2", "3")),
    ]
    problems = [resolve(r, documents) for r in refs]
    assert problems[:2] == [None, None]
    assert "no section §5" in str(problems[2])
    assert "nope.md does not exist" in str(problems[3])
    assert "§2.1, §2.2, §2.3" in str(problems[4])
    assert problems[5] is None  # the quoted title matches a section title
    assert "no section titled" in str(problems[6])
    assert len(refs) == 7


def test_the_checker_catches_bad_headings() -> None:
    ok = "# T\n\n## §1 A\n\n### §1.1 B\n\n## §2 C\n\n```\n## not a heading\n```\n"
    assert parse_headings(ok) == ([], {"1": "A", "1.1": "B", "2": "C"})
    errors, _ = parse_headings("# T\n## 1. A\n## §2 B\n### §3.1 C\n## §2 D\n#### §2.1 E\n")
    assert len(errors) == 4, errors
