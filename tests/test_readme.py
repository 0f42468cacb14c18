"""The README's Python blocks run, in order, in one namespace: the quick start cannot drift."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["result"].logits.shape == (8, 10)
    assert namespace["calibration"].spec.thresholds is not None
