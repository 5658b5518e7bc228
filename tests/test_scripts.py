"""The install paths: what scripts/setup, scripts/demo and scripts/test install, and the Python they say they need.

apt-get, dpkg and sudo are replaced by stubs that record their calls, so nothing is installed by these tests."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
STUB = """#!/bin/sh
[ -t 0 ] && tty=tty || tty=no-tty
echo "$(basename "$0") $* [DEBIAN_FRONTEND=${DEBIAN_FRONTEND:-} stdin=$tty]" >> "$STUB_LOG"
[ "$(basename "$0")" = dpkg ] && exit 1
exit 0
"""


def stubbed(tmp_path):
    """An environment whose apt-get, dpkg and sudo only record their calls (dpkg says every package is missing)."""
    folder = tmp_path / "stubs"
    folder.mkdir()
    for name in ("apt-get", "dpkg", "sudo"):
        (folder / name).write_text(STUB)
        (folder / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    return dict(os.environ, PATH=f"{folder}:{os.environ['PATH']}", STUB_LOG=str(log)), log


def test_demo_and_plain_setup_install_no_system_package(tmp_path):
    """scripts/demo (even --help) once apt-installed openssh-server, which starts an sshd on the user's machine."""
    env, log = stubbed(tmp_path)
    done = subprocess.run([str(ROOT / "scripts/demo"), "--help"], env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and "sepconv-demo" in done.stdout, done.stderr[-2000:]
    done = subprocess.run([str(ROOT / "scripts/setup")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert log.read_text() == "", "no apt-get, dpkg or sudo without --for-tests"


def test_setup_for_tests_installs_the_deploy_tests_packages_without_asking(tmp_path):
    env, log = stubbed(tmp_path)
    done = subprocess.run([str(ROOT / "scripts/setup"), "--for-tests"], env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    calls = log.read_text().splitlines()
    install = [c for c in calls if c.startswith("apt-get install")]
    assert len(install) == 1, calls
    assert all(p in install[0] for p in ("openssh-server", "qemu-user-static", "debootstrap", "chromium", " -y "))
    assert "DEBIAN_FRONTEND=noninteractive stdin=no-tty" in install[0]
    if os.geteuid() == 0:
        assert not [c for c in calls if c.startswith("sudo")], "as root, no sudo"
    for script in ("test", "pi-emulator"):
        assert "scripts/setup --for-tests" in (ROOT / "scripts" / script).read_text()
    assert re.search(r"^scripts/setup$", (ROOT / "scripts/demo").read_text(), re.M)


def test_the_stated_python_support_is_one_and_true():
    """pyproject's requires-python, setup's check and the README say the same version, and this interpreter (the
    one the suite runs on) meets it."""
    required = re.search(r'^requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    major, minor = int(required[1]), int(required[2])
    setup = (ROOT / "scripts/setup").read_text()
    assert f"sys.version_info < ({major}, {minor})" in setup and f"older than Python {major}.{minor}" in setup
    readme = (ROOT / "README.md").read_text()
    assert f"Requirements: Python {major}.{minor}+" in readme and "3.9+ (tested" not in readme
    assert sys.version_info >= (major, minor)


def test_repeat_mode_collects_the_slow_tests_n_times_in_a_random_order():
    """scripts/test --repeat N (the flakiness check): only the slow tests, each N times, shuffled with a printed seed."""
    env = dict(os.environ, SEPCONV_TEST_WORKERS="0")
    listed = subprocess.run([str(ROOT / "scripts/test"), "--repeat", "3", "--collect-only",
                             "tests/test_demo_cli.py"], env=env, capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL)
    assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
    ids = [line.strip() for line in listed.stdout.splitlines() if line.strip().startswith("<Function ")]
    expected = [f"<Function test_demo_separates_converts_benchmarks_and_reports[{n}-3]>" for n in (1, 2, 3)]
    assert sorted(ids) == expected, f"the file's one slow test (and no other), three times: {ids}"
    assert "Using --randomly-seed=" in listed.stdout
    refused = subprocess.run([str(ROOT / "scripts/test"), "--repeat", "x"], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
    assert refused.returncode == 2 and "--repeat takes a count >= 1" in refused.stderr


def test_every_name_a_benchmark_script_imports_from_sepconv_exists():
    """The benchmark scripts import sepconv inside their functions (so that --help is instant), where a name removed
    from the package fails only when the benchmark runs: scripts/bench-recovery imported REFINED_LEARNING_RATE for
    sessions after issue 11 removed it. Every such name must exist."""
    import ast
    import importlib

    missing = []
    for script in sorted((ROOT / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sepconv"):
                module = importlib.import_module(node.module)
                missing += [f"{script.name}: {node.module}.{alias.name}" for alias in node.names
                            if not hasattr(module, alias.name) and not (
                                hasattr(module, "__path__")  # a package: the name may be a submodule
                                and importlib.util.find_spec(f"{node.module}.{alias.name}") is not None)]
    assert not missing, "names the scripts import that sepconv does not have:\n" + "\n".join(missing)


def test_bench_zoo_keeps_tensorflow_out_of_its_own_process(tmp_path):
    """A child's peak resident set starts at its parent's: bench-zoo reads the zoo in a child (importing it imports
    TensorFlow, 646 MiB here) so that its runs' peaks are their own, and prints its table without TensorFlow."""
    row = {"model": "tutorial", "mode": "default", "exit": 1, "seconds": 1.0, "peak_rss_mib": 10,
           "original_accuracy": 0.9, "params_before": 10, "error": "convert-model: error: boom"}
    (tmp_path / "bench-zoo.json").write_text(json.dumps({"cpu": "CPU: test", "rows": [row]}))
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import bench_zoo; names = bench_zoo.zoo_names(); "
             "bench_zoo.main(['--table', '--out', sys.argv[2]]); print(names, 'tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, str(ROOT / "scripts"), str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exit 1" in done.stdout and "boom" in done.stdout, done.stdout
    assert done.stdout.strip().splitlines()[-1].endswith("'rescaling'] False"), done.stdout[-500:]


def test_bench_zoo_int8_table_keeps_a_bar_in_its_cell_and_times_the_diagnosis():
    """A fallback's reasons are joined by " | " (the manifest's quantize_fallback.reason): in a Markdown table cell
    the bar must be escaped, or the row gains a column and every cell after it moves (seen on the nested MobileNetV2,
    whose int8 failed and whose dynamic fallback was slower than float32)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_zoo
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    row = {"model": "m", "mode": "default", "exit": 0, "seconds": 10.0, "quantize": "none", "int8_accuracy": 0.5,
           "fallback": "int8: no attempt passed | dynamic: dynamic ran slower", "int8_attempts": ["as requested: 90%"],
           "verification": "relative max error 1e-05 <= 0.0001", "repair_seconds": 2.0, "diagnosis_seconds": 1.0}
    lines = bench_zoo.int8_table([row]).splitlines()
    columns = [len(re.split(r"(?<!\\)\|", line)) for line in lines]
    assert len(set(columns)) == 1, "\n".join(lines)
    assert "no attempt passed \\| dynamic: dynamic ran slower" in lines[-1], lines[-1]
    assert "2.0 (+25%); diagnosis 1.0, both +43%" in lines[-1], "of 10 s: the repair on the other 8, both on 7"
