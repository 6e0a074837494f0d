"""The docs cannot rot: every ```python block of docs/*.md and README.md runs, and the reference
pages name every setting, metric and finding kind the code has."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import perfmw
from perfmw.exporters.prometheus import PrometheusSink
from perfmw.findings import KINDS
from perfmw.settings import env_name

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[str, int, str]]:
    """(page, line of the fence, code) of every ```python block."""
    blocks = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((str(page.relative_to(ROOT)), line, match.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_the_docs_have_python_blocks() -> None:
    pages = {page for page, _, _ in BLOCKS}
    assert {"README.md", "docs/getting-started.md", "docs/configuration.md"} <= pages


@pytest.mark.parametrize(
    ("page", "line", "code"), BLOCKS, ids=[f"{page}:{line}" for page, line, _ in BLOCKS]
)
def test_python_block_runs(page: str, line: int, code: str, mongo_uri: str, tmp_path: Path) -> None:
    """Each block on its own, in a fresh interpreter, as a reader would paste it.

    MONGODB_URI points at the embedded MongoDB (blocks read it with a localhost default); the
    working directory is empty, the repository importable (for `examples`).
    """
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PERFMW_")},
        "MONGODB_URI": mongo_uri,
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        f"the python block at {page}:{line} failed:\n{result.stdout}\n{result.stderr}"
    )


def page(name: str) -> str:
    return (ROOT / "docs" / name).read_text(encoding="utf-8")


def test_configuration_names_every_setting_and_its_variable() -> None:
    text = page("configuration.md")
    for field in dataclasses.fields(perfmw.Settings):
        assert f"`{field.name}`" in text, field.name
        assert f"`{env_name(field.name)}`" in text, env_name(field.name)


def test_metrics_reference_names_every_metric() -> None:
    text = page("metrics.md")
    names = {metric.name for metric in PrometheusSink().collect()}
    # Read at scrape time by the sources (caches, pools, the loop monitor).
    names |= {
        "perfmw_cache_requests",
        "perfmw_cache_evictions",
        "perfmw_cache_size",
        "perfmw_cache_max_size",
        "db_client_connection_count",
        "perfmw_event_loop_lag_seconds",
    }
    for name in sorted(names):
        # Counters are named without _total by prometheus_client, with it on the wire.
        assert f"`{name}`" in text or f"`{name}_total`" in text, name


def test_findings_reference_has_a_section_per_kind() -> None:
    text = page("findings.md")
    for kind in KINDS:
        assert re.search(rf"^## `{kind}`", text, re.MULTILINE), kind
    assert "silenced_locations" in text


def test_links_between_pages_resolve() -> None:
    for source in PAGES:
        text = source.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", text):
            assert (source.parent / target).exists(), f"{source.name} links to missing {target}"


def test_the_readme_gets_a_newcomer_to_the_report_in_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "make demo" in readme and "make test" in readme
    # `make demo` builds the environment itself, then runs the demo that prints the report.
    demo = re.search(r"^demo: (.*)\n\t(.*)$", makefile, re.MULTILINE)
    assert demo is not None
    assert "$(STAMP)" in demo.group(1)
    assert demo.group(2).endswith("-m examples.fastapi_app.demo")


def test_every_row_of_the_fault_table_names_tests_that_exist() -> None:
    """docs/production.md's fault table: each row backed by a test, each named test real."""
    text = (ROOT / "docs" / "production.md").read_text(encoding="utf-8")
    table = text.split("## When something around it fails", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 8  # the header, then a row per fault
    for row in rows[1:]:
        named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row)
        assert named, row
        for path, name in named:
            source = (ROOT / path).read_text(encoding="utf-8")
            assert re.search(rf"^def {name}\(", source, re.MULTILINE), f"{path}::{name}"
