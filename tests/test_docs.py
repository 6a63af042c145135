"""The README and docs/ stay true to the repo: links resolve, named commands exist, CI's command is there.

Fast and process-free: it reads the Markdown files and the CLI's parser, nothing else.
"""

import re
import unicodedata
from functools import cache
from pathlib import Path

import pytest

from cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "results" / "README.md"]

# The README's two Quick start commands, byte for byte: `.ci/run` runs the second one.
RUN_COMMAND = (
    "python3.11 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
    "pip install -e '.[worker]' && dit-serve up"
)
TEST_COMMAND = (
    "python3.11 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
    "pip install -e '.[worker,test]' && ruff check . && ruff format --check . && mypy && pytest"
)

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`+[^`]*`+")
SUBCOMMAND = re.compile(r"\bdit-serve[ \t]+([a-z][a-z0-9_|-]*)")
BENCH_MODULE = re.compile(r"\bpython3?[ \t]+-m[ \t]+bench\.([A-Za-z_][\w.]*)")
# History told as news, or plans pinned to issue numbers: the docs say what is.
FORBIDDEN = [
    (re.compile(r"still to come", re.IGNORECASE), "says something is 'still to come'"),
    (re.compile(r"\(issue \d+\)|\bissue \d+'s\b", re.IGNORECASE), "points at an issue number as a plan"),
]


def _doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _split_fences(text: str) -> tuple[list[str], list[str]]:
    """(lines outside fenced code blocks, lines inside them)."""
    prose: list[str] = []
    code: list[str] = []
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (links and headings live there)."""
    return _split_fences(text)[0]


def code_text(text: str) -> str:
    """What the page shows as code: fenced blocks and inline code spans, where commands are written."""
    prose, code = _split_fences(text)
    spans = [span.strip("`") for line in prose for span in INLINE_CODE.findall(line)]
    return "\n".join(code + spans)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower-cased, punctuation removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    kept = []
    for char in text.lower():
        category = unicodedata.category(char)
        if char in " -" or category[0] in "LMN" or category == "Pc":  # github-slugger keeps these
            kept.append("-" if char == " " else char)
    return "".join(kept)


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for line in _prose_lines(path.read_text()):
        if match := HEADING.match(line):
            slug = github_slug(match.group(2))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return frozenset(found)


def links(path: Path) -> list[str]:
    """Link and image targets outside code blocks and code spans."""
    targets = []
    for line in _prose_lines(path.read_text()):
        targets += LINK.findall(INLINE_CODE.sub("", line))
    return targets


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{target}: no file {linked}")
        elif file_part and path.is_relative_to(ROOT) and not linked.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{target}: no heading with anchor #{anchor} in {_doc_id(linked)}")
    return problems


def subcommands() -> set[str]:
    parser = build_parser()
    (commands,) = [action for action in parser._actions if action.dest == "command"]
    return set(commands.choices)


def unknown_subcommands(text: str) -> list[str]:
    """`dit-serve WORD` in the page's code that is not a subcommand (`up|api` names two)."""
    known = subcommands()
    named = [name for match in SUBCOMMAND.findall(code_text(text)) for name in match.split("|")]
    return sorted({name for name in named if name not in known})


def missing_bench_modules(text: str) -> list[str]:
    """`python -m bench.X` anywhere on the page where bench/X.py (or a bench/X package) does not exist."""
    missing = []
    for module in set(BENCH_MODULE.findall(text)):
        path = ROOT / "bench" / Path(*module.rstrip(".").split("."))
        if not (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()):
            missing.append(f"bench.{module}")
    return sorted(missing)


def quick_start_commands(readme_text: str) -> list[str]:
    """The fenced blocks' contents between '## Quick start' and the next '## ' heading."""
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", readme_text, re.MULTILINE | re.DOTALL)
    assert section, "README has no '## Quick start' section"
    return [block.strip() for block in re.findall(r"^```\w*\n(.*?)^```", section.group(1), re.M | re.S)]


def forbidden_phrases(text: str) -> list[str]:
    return [f"{why}: {match.group(0)!r}" for pattern, why in FORBIDDEN for match in pattern.finditer(text)]


@pytest.mark.parametrize("path", DOCS, ids=_doc_id)
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    assert broken_links(path) == []


@pytest.mark.parametrize("path", DOCS, ids=_doc_id)
def test_every_dit_serve_subcommand_named_exists(path: Path) -> None:
    assert unknown_subcommands(path.read_text()) == [], f"dit-serve's subcommands: {sorted(subcommands())}"


@pytest.mark.parametrize("path", DOCS, ids=_doc_id)
def test_every_bench_module_named_exists(path: Path) -> None:
    assert missing_bench_modules(path.read_text()) == []


@pytest.mark.parametrize("path", DOCS, ids=_doc_id)
def test_no_history_told_as_news_or_plans_by_issue_number(path: Path) -> None:
    assert forbidden_phrases(path.read_text()) == []


def test_readme_quick_start_has_the_run_and_test_commands() -> None:
    assert quick_start_commands(README.read_text()) == [RUN_COMMAND, TEST_COMMAND]


def test_ci_runs_the_readme_test_command() -> None:
    assert (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == TEST_COMMAND


def test_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """Each check fails on a broken example, so a passing run means something."""
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n## Two words\n\n[ok](#two-words) [bad](#three-words) [gone](missing.md)\n")
    assert [problem.split(":")[0] for problem in broken_links(page)] == ["#three-words", "missing.md"]
    assert github_slug("The GPU fast path: `--compile` ×4 (H200)") == "the-gpu-fast-path---compile-4-h200"
    assert unknown_subcommands("`dit-serve bogus --rates 6`, `dit-serve up|api`, dit-serve runs") == ["bogus"]
    assert unknown_subcommands("```sh\ndit-serve bench-batching --rates 6\n```\n") == ["bench-batching"]
    named = "python -m bench.service; python -m bench.nothing_here"
    assert missing_bench_modules(named) == ["bench.nothing_here"]
    assert len(forbidden_phrases("Continuous batching is still to come (issue 5).")) == 2
    assert quick_start_commands("## Quick start\n\n```sh\na\n```\n\n```sh\nb\n```\n\n## Next\n") == ["a", "b"]
