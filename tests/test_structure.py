"""Guards on the shape of the code the vocabulary issue asked for (issue 14)."""

import ast
from pathlib import Path

import tlq

ROOT = Path(tlq.__file__).parent


def test_the_loop_and_its_steps_stay_short():
    """Every function of the layer loop, the rescaling step and the API is under 50 lines: a step that
    grows past that is doing two things."""
    long = []
    for name in ("engine.py", "api.py", "rescale.py"):
        tree = ast.parse((ROOT / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length >= 50:
                    long.append(f"{name}:{node.name} {length} lines")
    assert not long, long
