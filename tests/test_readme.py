"""The README's example code runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


def test_readme_has_exactly_two_setup_commands_on_top():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert first and text.index("```bash") < text.index("##"), "the set-up block must come before any section"
    commands = [line for line in first.group(1).splitlines() if line.strip()]
    assert len(commands) == 2 and "pytest" in commands[1] and "protdiff-fast" in commands[0]
