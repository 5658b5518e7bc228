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
    assert "6.79x smaller" in printed and "top-1 agreement" in printed
    agreement = float(re.search(r"top-1 agreement ([0-9.]+)%", printed).group(1))
    assert agreement >= 90.0, ("a trained model's int8 agrees with its Keras model (the example verified an untrained "
                               "one: 2.44%)", printed)
    assert (tmp_path / "tutorial.onnx").exists() and (tmp_path / "tutorial.onnx.json").exists()
    assert (tmp_path / "model.tflite").exists()
