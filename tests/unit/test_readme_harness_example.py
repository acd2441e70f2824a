"""The README's harness examples run as written, each in a pytest process of its own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _passes(section: str, tmp_path: Path) -> str:
    """The first Python block after ``section``, run as a test module; pytest's output."""
    after = README.read_text().split(section, 1)[1]
    block = re.search(r"```python\n(.*?)```", after, re.S)
    assert block is not None
    (tmp_path / "test_example.py").write_text(block.group(1))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.timeout(60)
def test_the_readme_handler_test_passes_with_the_postroom_harness_fixture(tmp_path: Path) -> None:
    assert "1 passed" in _passes("## Testing a handler", tmp_path)


@pytest.mark.timeout(60)
def test_the_readme_circuit_breaker_example_passes_in_the_harness(tmp_path: Path) -> None:
    assert "1 passed" in _passes("### Circuit breakers", tmp_path)


@pytest.mark.timeout(60)
def test_the_readme_query_fallback_example_passes_in_the_harness(tmp_path: Path) -> None:
    assert "1 passed" in _passes("### Query fallbacks", tmp_path)


@pytest.mark.timeout(60)
def test_the_readme_rate_limit_example_passes_in_the_harness(tmp_path: Path) -> None:
    assert "1 passed" in _passes("### Rate limits", tmp_path)


@pytest.mark.timeout(60)
def test_the_readme_ordered_dead_letters_example_passes_in_the_harness(tmp_path: Path) -> None:
    assert "1 passed" in _passes("### Dead letters that keep order", tmp_path)


def test_the_readme_reply_to_a_callback_example_passes_in_the_harness(tmp_path: Path) -> None:
    assert "1 passed" in _passes("### Replies to a callback", tmp_path)


def test_the_readme_process_manager_example_passes_in_the_harness(tmp_path: Path) -> None:
    assert "1 passed" in _passes("## Process managers", tmp_path)
