"""The README's two set-up commands are the ones CI runs (.ci/run reads them from the README)."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _command_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {marker} -->\n```bash\n(.+)\n```", text)
    assert found, f"README.md has no one-line bash block right after <!-- {marker} -->"
    return found.group(1).strip()


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command install-command" in ci and "readme_command test-command" in ci
    assert "pip install" in _command_after("install-command")
    assert "pytest" in _command_after("test-command")


def test_quick_start_runs():
    """The README's Quick start block runs as written (on CPU)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start"):text.index("## API")]
    code = re.search(r"```python\n(.+?)```", section, re.S)
    assert code, "README.md: no python block under Quick start"
    namespace: dict = {}
    exec(compile(code.group(1), "README.md quick start", "exec"), namespace)
    assert namespace["y_t"].shape == namespace["token"].shape
