"""The README's Python example runs as written."""
import re

from helpers import ROOT

README = ROOT / "README.md"


def test_readme_example_runs():
    text = README.read_text()
    block = re.search(r"<!-- ci:example -->\n```python\n(.*?)```\n<!-- /ci:example -->", text, re.S)
    assert block, "README lost its example block"
    exec(compile(block.group(1), str(README), "exec"), {})
