"""The README's Python example runs as written against the installed package."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_metalearner_example_runs():
    text = README.read_text(encoding="utf-8")
    match = re.search(r"### MetaLearner in your own loop.*?```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its MetaLearner example"
    namespace: dict = {}
    exec(compile(match.group(1), str(README), "exec"), namespace)
    assert namespace["logits"].shape == (8, 5, 5)
    assert namespace["query_logits"].shape == (8, 5, 5)
    assert set(namespace["fast_weights"]) == set(namespace["learner"].inner_loop_parameter_names)
