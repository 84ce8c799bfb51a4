"""The code blocks of README.md and docs/*.md as tests (tests/test_docs.py), parsed by Sybil.

A page's examples are its visible code blocks, each with what precedes it for it (a
:class:`CodeExample`): Sybil's ``<!-- skip: next "reason" -->``, ``<!-- docs-test: ... -->``
directives (:class:`Directive`) and invisible setup blocks (``<!-- invisible-code-block:
python`` or ``bash``). Each example runs on its own, in a fresh :class:`~helpers.docs_sandbox.
Sandbox` and a fresh namespace, so pytest-xdist can spread them over workers:

- ``python``: executed in the test's process, in the sandbox (Sybil's
  ``PythonCodeBlockParser``);
- ``bash``: run by bash in the sandbox, ``gradtrace`` shrunk; every command must succeed;
- ``console``: a transcript: each ``$ `` line runs as written (``gradtrace`` not shrunk) and
  what it prints (stdout and stderr) must match the lines below it, where ``...`` stands for
  any text.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sybil import Document, Example, Region, Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, RawFencedCodeBlockLexer

from helpers.docs_sandbox import Sandbox

__all__ = [
    "DIRECTIVE",
    "SANDBOX",
    "CodeExample",
    "Directive",
    "collect_code_examples",
    "console_transcript",
    "fenced_blocks",
    "matches_with_wildcards",
    "shell_commands",
]

SANDBOX = "docs_sandbox"
"""The key of the test's :class:`~helpers.docs_sandbox.Sandbox` in a page's namespace."""
DIRECTIVE = "docs-test"
RUN_LANGUAGES = ("python", "bash", "console")
OUTPUT_TAIL = 4000


@dataclass(frozen=True)
class Directive:
    """``<!-- docs-test: KEYWORD ARGUMENTS -->``, for the next code block:

    - ``slow``: the example takes more than about 10 s (marked ``slow``);
    - ``env NAME=VALUE ...``: environment variables for its commands (shell words; ``$NAME``
      in a value is the sandbox's variable, e.g. ``$DOCS_TEST_OVERRIDES``).
    """

    keyword: str
    arguments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Directive:
        keyword, *arguments = shlex.split(text)
        if keyword not in ("slow", "env"):
            raise ValueError(f"unknown {DIRECTIVE} directive {keyword!r}: slow or env")
        if keyword == "env" and not all("=" in argument for argument in arguments):
            raise ValueError(f"{DIRECTIVE}: env takes NAME=VALUE words; got {text!r}")
        return cls(keyword, tuple(arguments))

    def __call__(self, example: Example) -> None:
        """Applies the directive to the test's sandbox."""
        if self.keyword == "env":
            sandbox: Sandbox = example.namespace[SANDBOX]
            for argument in self.arguments:
                name, value = argument.split("=", 1)
                sandbox.env[name] = re.sub(
                    r"\$(\w+)|\$\{(\w+)\}",
                    lambda m: sandbox.env[m.group(1) or m.group(2)],
                    value,
                )


class DirectiveParser:
    """Sybil parser of ``<!-- docs-test: ... -->`` directives."""

    def __init__(self) -> None:
        self.lexer = DirectiveInHTMLCommentLexer(DIRECTIVE)

    def __call__(self, document: Document) -> Iterable[Region]:
        for lexed in self.lexer(document):
            directive = Directive.parse(lexed.lexemes["arguments"])
            yield Region(lexed.start, lexed.end, directive, directive, lexemes=lexed.lexemes)


def _output_tail(output: str) -> str:
    return output if len(output) <= OUTPUT_TAIL else "...\n" + output[-OUTPUT_TAIL:]


def run_shell_block(example: Example) -> str | None:
    """Sybil evaluator of ``bash`` blocks: every command succeeds in the sandbox."""
    sandbox: Sandbox = example.namespace[SANDBOX]
    result = sandbox.run(example.parsed)
    if result.returncode:
        return f"exit status {result.returncode}; output:\n{_output_tail(result.stdout)}"
    return None


def console_transcript(source: str) -> list[tuple[str, str]]:
    """``(command, expected output)`` of each ``$ `` line of a console block."""
    transcript: list[tuple[str, list[str]]] = []
    for line in source.splitlines():
        if line.startswith("$ "):
            transcript.append((line[2:], []))
        elif transcript:
            transcript[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"a console block starts with a `$ ` line; got {line!r}")
    return [(command, "\n".join(output)) for command, output in transcript]


def matches_with_wildcards(expected: str, actual: str) -> bool:
    """``actual`` is ``expected`` with each ``...`` standing for any text (lines too);
    trailing spaces and blank lines do not count."""

    def normal(text: str) -> str:
        return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())

    pattern = ".*?".join(re.escape(part) for part in normal(expected).split("..."))
    return re.fullmatch(pattern, normal(actual), re.DOTALL) is not None


def check_console_block(example: Example) -> str | None:
    """Sybil evaluator of ``console`` blocks: each command, run as written, prints what the
    block shows."""
    sandbox: Sandbox = example.namespace[SANDBOX]
    for command, expected in console_transcript(example.parsed):
        result = sandbox.run(command, shrunk=False)
        if not matches_with_wildcards(expected, result.stdout):
            return (
                f"$ {command}\nprinted (exit status {result.returncode}):\n"
                f"{_output_tail(result.stdout)}\nexpected:\n{expected}"
            )
    return None


DOCS_SYBIL = Sybil(
    parsers=[
        PythonCodeBlockParser(),
        CodeBlockParser(language="bash", evaluator=run_shell_block),
        CodeBlockParser(language="console", evaluator=check_console_block),
        SkipParser(),
        DirectiveParser(),
    ]
)


def _is_visible_block(region: Region) -> bool:
    # Fenced blocks have no "directive" lexeme; invisible blocks and directives have one.
    return "source" in region.lexemes and "directive" not in region.lexemes


@dataclass(frozen=True)
class CodeExample:
    """A visible code block of a page with its directives and setup blocks, run as one test."""

    page: str
    """The page's path relative to the repository, e.g. ``docs/training.md``."""
    line: int
    language: str
    examples: tuple[Example, ...]

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def directives(self) -> list[Directive]:
        return [e.parsed for e in self.examples if isinstance(e.parsed, Directive)]

    @property
    def slow(self) -> bool:
        return any(d.keyword == "slow" for d in self.directives)

    @property
    def source(self) -> str:
        """The visible block's text."""
        return str(self.examples[-1].parsed)

    def evaluate(self, sandbox: Sandbox) -> None:
        """Run the example in ``sandbox``: directives, setup blocks, then the block (Sybil's
        skip directive raises ``unittest.SkipTest``, which pytest reports as a skip)."""
        namespace = self.examples[0].document.namespace
        namespace.clear()
        namespace[SANDBOX] = sandbox
        for example in self.examples:
            example.evaluate()


def collect_code_examples(pages: Sequence[Path], repo_root: Path) -> list[CodeExample]:
    """Every visible ``python``, ``bash`` and ``console`` block of ``pages``, in order."""
    collected = []
    for page in pages:
        document = DOCS_SYBIL.parse(page)
        pending: list[Example] = []
        for example in document.examples():
            pending.append(example)
            if _is_visible_block(example.region):
                collected.append(
                    CodeExample(
                        page=page.relative_to(repo_root).as_posix(),
                        line=example.line,
                        language=str(example.region.lexemes["arguments"]),
                        examples=tuple(pending),
                    )
                )
                pending = []
        if pending:
            raise ValueError(
                f"{page}, line {pending[0].line}: a directive or invisible block must precede a "
                "code block"
            )
    return collected


def fenced_blocks(page: Path) -> list[tuple[int, str, str]]:
    """``(line, language, text)`` of every fenced code block of ``page`` (language ``""``
    when none is given), run or not."""
    lexer = RawFencedCodeBlockLexer(
        info_pattern=re.compile(r"(?P<language>[^\n]*)$\n", re.MULTILINE),
        mapping={"language": "language", "source": "source"},
    )
    document = Document(page.read_text(), str(page))
    return [
        (
            document.text.count("\n", 0, region.start) + 1,
            region.lexemes["language"].strip(),
            str(region.lexemes["source"]),
        )
        for region in lexer(document)
    ]


def shell_commands(source: str) -> list[list[str]]:
    """The commands of a shell block as argument lists: lines continued with ``\\`` joined,
    comments and blank lines left out."""
    logical = source.replace("\\\n", " ").splitlines()
    return [words for line in logical if (words := shlex.split(line, comments=True))]
