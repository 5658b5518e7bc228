"""The README's Python example runs as written."""

import os
import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_python_api_example_runs(tmp_path, capsys):
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(here)
    printed = capsys.readouterr().out
    assert "6.79x smaller" in printed and "top-1 agreement" in printed and ">= 98.00%" in printed, \
        "a trained model's int8 agrees with its Keras model (the example used to verify an untrained one)"
    assert (tmp_path / "tutorial.onnx").exists() and (tmp_path / "tutorial.onnx.json").exists()
    assert (tmp_path / "small.tflite").exists()
