"""The docs as tests: every code block of README.md and docs/*.md runs, so an example that
drifts from the code fails.

How (Sybil parses the pages; tests/helpers/docs_examples.py runs the blocks):

- Each visible ``python``, ``bash`` or ``console`` block is one test, with an id like
  ``docs/training.md:12`` (its first line), run in a fresh sandbox directory
  (tests/helpers/docs_sandbox.py) and a fresh namespace; pytest-xdist spreads them over the
  workers. ``python`` blocks execute in the test's process, ``bash`` blocks run with bash
  (``set -euo pipefail``), ``console`` blocks run each ``$ `` line and compare what it prints
  with the lines below it (``...`` stands for any text).
- Setup that a block needs (a model, finished runs) goes right before it in an invisible
  block, ``<!-- invisible-code-block: python`` (or ``bash``) ... ``-->``, which runs first in
  the same sandbox and namespace.
- Speed: the sandbox's ``gradtrace`` forks from a process per worker that has imported
  gradtrace once (tests/helpers/fork_server.py), so a command skips the ~5 s of imports a
  fresh process pays (a docs-test run took 150 s more without it).
- Shrinking: in ``bash`` blocks ``gradtrace`` is a shim that appends
  ``docs_sandbox.SHRINK_OPTIONS`` (one epoch of two steps of 8 images, 16 validation images)
  to every ``fit``/``validate``/``test``/``predict``, plus ``--data.md5`` of the sandbox's
  small CIFAR archive (its ``data/`` holds CIFAR-10/100 and Fashion-MNIST files in the real
  formats, 32 training and 16 test images each), and ``--seeds 1 --batch-size 8`` to every
  ``probe``. The sandbox's ``sweeps/*.yaml`` are cut to one cell and carry the same options.
  Launchers that start ``python -m gradtrace`` themselves (``make reproduce-table1``, ``make
  demo``) are shrunk through their documented ``ARGS``, set by a directive next to the block:
  ``<!-- docs-test: env ARGS="-- $DOCS_TEST_OVERRIDES" -->``. ``console`` blocks run as
  written: their output is the point.
- ``<!-- docs-test: slow -->`` marks a block that takes more than about 10 s ``slow``; every
  ``bash`` and ``console`` block is marked ``integration``.
- ``<!-- skip: next "reason" -->`` (Sybil's) skips the next block; the reason names what tests
  that path instead. Nothing in the sandbox can download (proxies that do not resolve) or
  reach a W&B server (offline mode).
"""

from __future__ import annotations

import os
import traceback
import unittest
from collections.abc import Iterator
from pathlib import Path

import pytest
from sybil.example import SybilFailure

from gradtrace.cli.trainer_cli import run_directory
from helpers.docs_examples import (
    RUN_LANGUAGES,
    CodeExample,
    collect_code_examples,
    console_transcript,
    fenced_blocks,
    matches_with_wildcards,
    shell_commands,
)
from helpers.docs_sandbox import DocsAssets, create_sandbox, resolved_settings, write_docs_assets
from helpers.fork_server import fork_server

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
CODE_EXAMPLES = collect_code_examples(PAGES, REPO_ROOT)
# Blocks that show text (a file tree, a table, output) rather than something to run.
TEXT_LANGUAGES = ("", "text", "yaml", "markdown")


def _param(example: CodeExample) -> pytest.param:
    marks = [pytest.mark.integration] if example.language != "python" else []
    marks += [pytest.mark.slow] if example.slow else []
    return pytest.param(example, id=example.id, marks=marks)


@pytest.fixture(scope="session")
def docs_assets(tmp_path_factory: pytest.TempPathFactory) -> DocsAssets:
    return write_docs_assets(tmp_path_factory.mktemp("docs-assets"))


@pytest.fixture(scope="session")
def gradtrace_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # One per worker: the sandbox's gradtrace commands fork from it instead of importing.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the sandbox's (read at import)
    with fork_server(tmp_path_factory.mktemp("fork-server"), env) as socket_path:
        yield socket_path


@pytest.mark.parametrize("code_example", [_param(e) for e in CODE_EXAMPLES])
def test_code_example(
    code_example: CodeExample,
    docs_assets: DocsAssets,
    gradtrace_server: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sandbox = create_sandbox(tmp_path, docs_assets, gradtrace_server)
    monkeypatch.chdir(sandbox.root)
    try:
        code_example.evaluate(sandbox)
    except unittest.SkipTest as skip:
        pytest.skip(f"{code_example.id}: {skip}")
    except SybilFailure as failure:  # a shell or console block: what it printed
        pytest.fail(str(failure), pytrace=False)
    except Exception as err:
        # The page's lines in the traceback, not pytest's listing of the page from line 1.
        pytest.fail("".join(traceback.format_exception(err)), pytrace=False)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_every_code_block_is_run_or_shows_text(page: Path) -> None:
    for line, language, text in fenced_blocks(page):
        where = f"{page.name}:{line}"
        assert language in RUN_LANGUAGES + TEXT_LANGUAGES, (
            f"{where}: ```{language} blocks are not run; use python, bash or console"
        )
        if language in TEXT_LANGUAGES:
            assert not text.startswith("$ "), f"{where}: a transcript: label it ```console"


def test_the_spelled_out_command_is_the_shipped_config_run() -> None:
    (block,) = [
        e for e in CODE_EXAMPLES if e.page == "docs/training.md" and "spelled out" in e.source
    ]
    commands = shell_commands(block.source)
    shipped = ["gradtrace", "fit", "--config", "table1/vgg38-bn-rc-lr1e-2"]
    assert shipped in commands
    (spelled_out,) = [c for c in commands if c[:2] == shipped[:2] and "--model.arch" in c]
    assert run_directory(spelled_out[1:]) == run_directory(shipped[1:])
    # The same in everything, callbacks included (which the run directory leaves out).
    assert resolved_settings(spelled_out[1:]) == resolved_settings(shipped[1:])


def test_console_transcripts_match_with_wildcards() -> None:
    source = "$ gradtrace fit --x\ngradtrace: error: bad --x (...)\n$ true\n"
    assert console_transcript(source) == [
        ("gradtrace fit --x", "gradtrace: error: bad --x (...)"),
        ("true", ""),
    ]
    assert matches_with_wildcards("error: bad (...)", "error: bad (see\nthis)  \n")
    assert matches_with_wildcards("first\n...\nlast", "first\nany\nlines\nlast")
    assert not matches_with_wildcards("error: bad", "error: bad\nand more")
    assert matches_with_wildcards("", "\n")
