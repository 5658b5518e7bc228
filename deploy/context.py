"""What a benchmark ran on: versions, CPU, OS, frequency governor; on a Raspberry Pi its model, temperature and
throttling. Every reading is optional: a file or command that is not there gives None, never an error.

`root` (default "/") lets the tests point the readers at a fake /proc and /sys.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from sepconv.deploy.runtime import package_version

LIBRARIES = ("sepconv", "numpy", "ai-edge-litert", "tflite-runtime", "onnxruntime")


def system(root: Path = Path("/")) -> dict:
    """The machine, read once per run."""
    cpuinfo = _read(root / "proc/cpuinfo") or ""
    fields = {}
    for line in cpuinfo.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            key = key.strip()  # "Model" (a Raspberry Pi's board) is not x86's "model" (a CPU model number)
            fields.setdefault(key if key == "Model" else key.lower(), value.strip())
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "tool": {"name": "sepconv bench-model", "version": package_version("sepconv")},
        "libraries": {name: package_version(name) for name in LIBRARIES if package_version(name)},
        "python": platform.python_version(),
        "os": _os_name(root) or platform.platform(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu": fields.get("model name") or fields.get("hardware") or fields.get("cpu model") or platform.processor()
        or None,
        "cores": os.cpu_count(),
        "cores_available": affinity,
        "governor": _read(root / "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "pi_model": (_read(root / "proc/device-tree/model") or "").rstrip("\0") or fields.get("Model"),
    }


def thermal(root: Path = Path("/")) -> dict:
    """Readings that change during a run (taken before and after): frequency, temperature, Pi throttling."""
    frequency = _read(root / "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    temperature = _read(root / "sys/class/thermal/thermal_zone0/temp")
    return {
        "cpu_mhz": round(int(frequency) / 1000, 1) if frequency and frequency.isdigit() else None,
        "temperature_c": round(int(temperature) / 1000, 1) if temperature and temperature.lstrip("-").isdigit()
        else None,
        "throttled": _throttled(),
    }


def _throttled() -> str | None:
    """`vcgencmd get_throttled` on a Raspberry Pi (e.g. 'throttled=0x0'; non-zero bits mean under-voltage or heat)."""
    command = shutil.which("vcgencmd")
    if not command:
        return None
    try:
        done = subprocess.run([command, "get_throttled"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _os_name(root: Path) -> str | None:
    for line in (_read(root / "etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode(errors="replace").strip() or None
    except OSError:
        return None
