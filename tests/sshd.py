"""A real OpenSSH server on 127.0.0.1 for the deploy tests: throw-away host and client keys, a private config.

The server runs as the user running the tests, with its own sshd_config, host key, authorized_keys and log in one
folder; the client side gets an ssh_config (alias `sepconv-test`) with its own key and known_hosts, so neither the
user's ~/.ssh nor the machine's sshd is touched. `stop()` kills it by PID.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
ALIAS = "sepconv-test"


class LoopbackSshd:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
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
            "PrintMotd no", "LogLevel ERROR", "Subsystem sftp internal-sftp", "MaxStartups 64:30:128", ""]))
        self.process = None

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
