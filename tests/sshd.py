"""A real OpenSSH server on 127.0.0.1 for the deploy tests: throw-away host and client keys, a private config.

The server runs as the user running the tests, with its own sshd_config, host key, authorized_keys and log in one
folder; the client side gets an ssh_config (alias `sepconv-test`) with its own key and known_hosts, so neither the
user's ~/.ssh nor the machine's sshd is touched. `stop()` kills it by PID.

The "device" is a userland of its own, not the host's login environment: every session gets HOME = `device_home`
(its working folder too; the host user's ~/.bashrc, ~/.ssh/rc and ~/.cache are never read), and PATH = `device_bin`
(where `python3` is the interpreter the test chose, by default this virtualenv's base interpreter by absolute path)
then /usr/bin:/bin. So no Python manager of the host (pyenv's shims and their rehash lock) takes part in a remote
step. The device's pip uses the package index this machine's pip is configured with (the user's pip.conf, copied,
and PIP_* variables), as a user configures a real device.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
ALIAS = "sepconv-test"
USER_PIP_CONFIGS = (".config/pip/pip.conf", ".pip/pip.conf")  # pip's per-user files, relative to the home folder


def base_python() -> Path:
    """This virtualenv's base interpreter, the real binary (never a pyenv or asdf shim that resolves it per call)."""
    return Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))


class LoopbackSshd:
    def __init__(self, folder: Path, python: Path | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.python = Path(python) if python else base_python()
        self.device_home, self.device_bin = self._device_userland()
        self.port = _free_port()
        self.user = getpass.getuser()
        self.host_key = self._keygen("host_key")
        self.client_key = self._keygen("client_key")
        self.authorized_keys = self.folder / "authorized_keys"
        self.authorized_keys.write_text(Path(f"{self.client_key}.pub").read_text())
        self.authorized_keys.chmod(0o600)
        self.known_hosts = self.folder / "known_hosts"
        host_public = Path(f"{self.host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_public[0]} {host_public[1]}\n")
        self.empty_known_hosts = self.folder / "known_hosts_empty"
        self.empty_known_hosts.write_text("")
        self.pid_file = self.folder / "sshd.pid"
        self.log = self.folder / "sshd.log"
        self.config = self.folder / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}", f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys}", "StrictModes no", "UsePAM no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
            "PrintMotd no", "LogLevel ERROR", "Subsystem sftp internal-sftp", "MaxStartups 64:30:128",
            "PermitUserRC no", f"SetEnv {self._session_environment()}",
            # the login shell runs this with the device's HOME (so no rc file of the host user's is read); the command
            # the client sent then runs in the device's home, as it would on a device
            'ForceCommand cd && exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"', ""]))
        self.process = None

    def _device_userland(self) -> tuple[Path, Path]:
        """device/home (with the host user's pip configuration) and device/bin/python3 -> the chosen interpreter."""
        home, bin_folder = self.folder / "device" / "home", self.folder / "device" / "bin"
        home.mkdir(parents=True, exist_ok=True)
        bin_folder.mkdir(exist_ok=True)
        (bin_folder / "python3").unlink(missing_ok=True)
        (bin_folder / "python3").symlink_to(self.python)
        for relative in USER_PIP_CONFIGS:
            if (Path.home() / relative).is_file():
                (home / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(Path.home() / relative, home / relative)
        return home, bin_folder

    def _session_environment(self) -> str:
        """sshd_config's SetEnv words: the device's HOME and PATH, and this machine's PIP_* settings."""
        pip = {name: value for name, value in os.environ.items() if name.startswith("PIP_") and '"' not in value}
        values = {"HOME": str(self.device_home), "PATH": f"{self.device_bin}:/usr/bin:/bin", **pip}
        return " ".join(f'"{name}={value}"' for name, value in values.items())

    def _keygen(self, name: str) -> Path:
        path = self.folder / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sepconv-{name}", "-f", str(path)],
                       check=True, capture_output=True)
        return path

    def client_config(self, name: str = "ssh_config", *, known_hosts: Path | None = None,
                      key: Path | None = None) -> Path:
        """An ssh_config for the alias `sepconv-test` (and 127.0.0.1) using the test key and known_hosts."""
        path = self.folder / name
        block = ["  HostName 127.0.0.1", f"  Port {self.port}", f"  User {self.user}",
                 f"  IdentityFile {key or self.client_key}", "  IdentitiesOnly yes",
                 f"  UserKnownHostsFile {known_hosts or self.known_hosts}", "  GlobalKnownHostsFile /dev/null",
                 "  StrictHostKeyChecking yes", "  LogLevel ERROR"]
        path.write_text("\n".join([f"Host {ALIAS} 127.0.0.1", *block, ""]))
        return path

    def start(self) -> "LoopbackSshd":
        if not Path(SSHD).exists():
            raise RuntimeError("sshd is not installed; scripts/setup --for-tests installs Debian's openssh-server")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self.process = subprocess.Popen([SSHD, "-D", "-f", str(self.config), "-E", str(self.log)],
                                        stdin=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"sshd did not listen on port {self.port}: {self.log.read_text()[-2000:]}")

    def device_files(self) -> set[str]:
        """Every path under the device's home, relative to it."""
        return {str(path.relative_to(self.device_home)) for path in self.device_home.rglob("*")}

    def sessions(self) -> list[int]:
        """PIDs of what runs under this sshd: its session processes and all they started (not the listener)."""
        children = _children_by_parent()
        found, todo = [], list(children.get(self.process.pid, [])) if self.process else []
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return sorted(found)

    def assert_left_nothing(self, files_before: set[str], seconds: float = 30) -> None:
        """After a remote step was stopped and its connection closed: no process runs under this sshd (waiting up to
        `seconds` for them to go), and the device's home holds no file it did not hold before (no lock, no partial
        copy, nothing a program left)."""
        deadline = time.time() + seconds
        while time.time() < deadline and self.sessions():
            time.sleep(0.2)
        assert self.sessions() == [], f"processes left on the device: {_command_lines(self.sessions())}"
        new = sorted(self.device_files() - files_before)
        assert new == [], f"files left in the device's home {self.device_home}: {new}"

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        self.process = None


def processes_mentioning(text: str) -> list[int]:
    """PIDs (not this one) whose command line holds `text`: the loopback "device" is this machine, so this is what
    runs on it (and the local ssh clients of a command that names it)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                found.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue
    return found


def wait_until_none_mention(text: str, seconds: float = 30) -> list[int]:
    """Wait (up to `seconds`) until no process mentions `text`; returns those still there."""
    deadline = time.time() + seconds
    while time.time() < deadline and processes_mentioning(text):
        time.sleep(0.2)
    return processes_mentioning(text)


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":  # a zombie has ended; it waits for its parent to read its status
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def _command_lines(pids: list[int]) -> list[str]:
    lines = []
    for pid in pids:
        try:
            lines.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:
            continue
    return lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
