"""The user's OpenSSH client, driven safely: batch mode, connection reuse, timeouts, and one-line errors.

sepconv speaks to a device through `ssh` exactly as the user would, so their `~/.ssh/config` (aliases,
users, ports, jump hosts), keys, agent and `known_hosts` all apply. Three rules hold everywhere:

- **Host keys are never accepted silently.** No `StrictHostKeyChecking=no`, no `accept-new`: an unknown or changed
  host key stops the run with a message that says how to check and accept it.
- **No user string reaches a shell unquoted.** A remote command is an argument list joined with `shlex.join`, the
  only form the remote shell receives; scripts go through standard input.
- Files are streamed through the same connection (`cat > tmp && mv`), so no remote path is ever parsed by scp.
- **Batch mode**: ssh never prompts (there may be no terminal), so a missing key is an error, not a hang.
- **Long steps die with their session** (`watch=True`): the remote program runs under a small watchdog that kills its
  process group when the session's standard input closes - when sepconv stops the step (Ctrl-C, `abort()`, a
  timeout) or dies - so no benchmark or install is left running on the device.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sepconv.deploy.errors import (AuthenticationError, HostKeyError, HostUnreachableError, InvalidOptionError,
                                   RemoteError)

SSH_FAILED = 255  # ssh's own exit status for connection and authentication failures
# A Unix socket path holds at most 104 bytes on macOS (108 on Linux), NUL included; ssh names the ControlPath
# `<dir>/%C` (40 hex digits) and first creates it under a temporary name 17 bytes longer.
SOCKET_PATH_LIMIT = 104
CONTROL_NAME_BYTES = 1 + 40 + 17

# Runs `argv` in its own process group and kills that group when standard input closes (the ssh session ended or
# sepconv stopped the step); exits with the program's status (128 + N for a signal, as a shell does).
WATCHDOG = """
import os, signal, subprocess, sys, threading
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, start_new_session=True)
def watch():
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    try:
        os.killpg(child.pid, signal.SIGTERM)
    except OSError:
        pass
threading.Thread(target=watch, daemon=True).start()
status = child.wait()
sys.exit(128 - status if status < 0 else status)
"""


@dataclass(frozen=True)
class Target:
    """A device as the user typed it: an ssh alias, `host`, `user@host`, `user@host:port` or `user@[::1]:port`."""

    spec: str
    destination: str  # what ssh gets (user@host or an alias)
    port: int | None = None

    @property
    def label(self) -> str:
        return self.spec


_WITH_PORT = re.compile(r"^(?P<dest>(?:[^@\s]+@)?(?:\[[^\]]+\]|[^:@\s\[\]]+)):(?P<port>\d+)$")


def parse_target(spec: str) -> Target:
    """Split `user@host:port` (IPv6 in brackets); anything else is handed to ssh as it is (aliases included)."""
    if not isinstance(spec, str) or not spec.strip() or spec.startswith("-") or any(c.isspace() for c in spec):
        raise InvalidOptionError(f"Unrecognized host {spec!r}. Use an ssh host: an alias of your ssh config, host, "
                                 f"user@host or user@host:port")
    match = _WITH_PORT.match(spec)
    if not match:
        return Target(spec=spec, destination=spec.replace("[", "").replace("]", ""))
    port = int(match["port"])
    if not 0 < port < 65536:
        raise InvalidOptionError(f"Unrecognized port {port} in {spec!r}. Use 1..65535")
    return Target(spec=spec, destination=match["dest"].replace("[", "").replace("]", ""), port=port)


@dataclass(frozen=True)
class SshOptions:
    """connect_timeout: seconds to establish a connection. config: an ssh_config file instead of ~/.ssh/config (-F).
    identity: a private key (-i). reuse: one master connection per host for all commands (ControlMaster)."""

    connect_timeout: int = 15
    config: str | None = None
    identity: str | None = None
    reuse: bool = True

    def __post_init__(self):
        if not isinstance(self.connect_timeout, int) or self.connect_timeout < 1:
            raise InvalidOptionError(f"Unrecognized connect_timeout={self.connect_timeout!r}. Use whole seconds >= 1")
        for name in ("config", "identity"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise InvalidOptionError(f"{name}={value!r}: no such file")


class Connection:
    """Commands and copies to one device over one (reused) ssh connection. Use as a context manager."""

    def __init__(self, target: Target, options: SshOptions = SshOptions()):
        self.target = target
        self.options = options
        self._control_dir = control_folder() if options.reuse else None
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self._aborted = False

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._control_dir is None:
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["ssh", *self._common(), "-O", "exit", self.target.destination], capture_output=True,
                           timeout=10, stdin=subprocess.DEVNULL)
        with contextlib.suppress(OSError):
            for entry in Path(self._control_dir).iterdir():
                entry.unlink()
            os.rmdir(self._control_dir)
        self._control_dir = None

    def abort(self) -> None:
        """Stop every command running on this connection now (from any thread), and refuse new ones: the ssh
        clients are killed, so the remote watchdogs see their sessions end and kill what they started."""
        with self._lock:
            self._aborted = True
            for process in self._running:
                with contextlib.suppress(OSError):
                    process.kill()

    def _common(self) -> list[str]:
        args = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.options.connect_timeout}",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if self.options.config:
            args += ["-F", self.options.config]
        if self.options.identity:
            args += ["-i", self.options.identity, "-o", "IdentitiesOnly=yes"]
        if self._control_dir:
            args += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self._control_dir}/%C",
                     "-o", "ControlPersist=120"]
        return args

    def run(self, argv: list[str], *, stdin: bytes | None = None, timeout: float | None = 600,
            check: bool = True, watch: bool = False,
            on_stderr: Callable[[str], None] | None = None) -> subprocess.CompletedProcess:
        """Run `argv` on the device (quoted for its shell); raise a one-line error if ssh itself failed. watch: run it
        under the watchdog (it is killed on the device when this step is stopped or times out; not with `stdin`).
        on_stderr: called with each line the program writes to stderr, as it comes."""
        command = shlex.join(str(a) for a in (["python3", "-c", WATCHDOG, *argv] if watch else argv))
        port = ["-p", str(self.target.port)] if self.target.port else []
        ssh = ["ssh", *self._common(), *port, "-T", "--", self.target.destination, command]
        try:
            done = self._execute(ssh, stdin, timeout, on_stderr)
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{self.target.label}: `{argv[0]}` did not finish within {timeout:.0f} s; the device "
                              f"is overloaded or stuck (raise --timeout, or check it with ssh)") from None
        except FileNotFoundError:
            raise RemoteError("the OpenSSH client (ssh) is not installed here; install it (apt install "
                              "openssh-client)") from None
        if self._aborted:
            raise RemoteError(f"{self.target.label}: stopped (interrupted)")
        if done.returncode == SSH_FAILED:
            raise classify_ssh_failure(self.target, done.stderr.decode(errors="replace"))
        if check and done.returncode != 0:
            raise RemoteError(f"{self.target.label}: `{shlex.join(str(a) for a in argv)[:120]}` failed with status "
                              f"{done.returncode}: {_last_line(done.stderr)}")
        return done

    def check(self) -> None:
        """Raise the one-line error `run` gives (unreachable, closed, host key ...) if the device cannot be reached
        now; used to tell a lost connection from a program that died on the device."""
        self.run(["true"], timeout=self.options.connect_timeout + 10)

    def _execute(self, ssh: list[str], data: bytes | None, timeout: float | None, on_stderr):
        """ssh with its standard input held open until it ends (the remote watchdog's lifeline) or fed `data`."""
        hold = os.pipe() if data is None else None
        with self._lock:
            if self._aborted:
                raise RemoteError(f"{self.target.label}: stopped (interrupted)")
            process = subprocess.Popen(ssh, stdin=hold[0] if hold else subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE)
            self._running.add(process)
        try:
            if hold:
                os.close(hold[0])
            if on_stderr is None:
                try:
                    out, err = process.communicate(data, timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.communicate()
                    raise
            else:
                out, err = _stream(process, timeout, on_stderr)
        finally:
            with self._lock:
                self._running.discard(process)
            if hold:
                os.close(hold[1])
        return subprocess.CompletedProcess(ssh, process.returncode, out, err)

    def put(self, source: Path | bytes, remote: str, *, timeout: float | None = 600) -> None:
        """Copy a local file (or bytes) to `remote` on the device: streamed through ssh into a temporary name, then
        renamed, so the device never holds a half-written file under the final name. Paths are quoted, whatever they
        contain."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        partial = f"{remote}.partial"
        self.run(["sh", "-c", 'cat > "$1" && mv -f -- "$1" "$2"', "sh", partial, remote], stdin=data,
                 timeout=timeout)


def control_folder() -> str:
    """A new private folder for the ControlMaster socket, short enough for every system's socket path limit: under
    the temporary folder, or /tmp when that is too deep (macOS's $TMPDIR is /var/folders/xx/.../T/, ~50 bytes)."""
    base = tempfile.gettempdir()
    if len(os.fsencode(base)) + len("/sepconv-ssh-12345678") + CONTROL_NAME_BYTES >= SOCKET_PATH_LIMIT:
        base = "/tmp"
    return tempfile.mkdtemp(prefix="sepconv-ssh-", dir=base)


def _stream(process: subprocess.Popen, timeout: float | None, on_stderr) -> tuple[bytes, bytes]:
    """Collect stdout whole and stderr line by line (each passed to `on_stderr`); kill the process at `timeout`."""
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(process.stdout.read()), daemon=True)
    reader.start()
    expired = threading.Event()
    timer = threading.Timer(timeout, lambda: (expired.set(), process.kill())) if timeout else None
    if timer:
        timer.start()
    lines = []
    try:
        for line in process.stderr:
            lines.append(line)
            on_stderr(line.decode(errors="replace").rstrip())
        process.wait()
        reader.join()
    finally:
        if timer:
            timer.cancel()
    if expired.is_set():
        raise subprocess.TimeoutExpired(process.args, timeout)
    return b"".join(chunks), b"".join(lines)


def classify_ssh_failure(target: Target, stderr: str) -> RemoteError:
    """ssh's exit status 255 with its stderr -> the one error that tells the user what to do."""
    name = target.label
    last = _last_line(stderr.encode())
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        return HostKeyError(f"{name}: the host key has CHANGED since you last connected (a reinstalled device, or "
                            f"someone in between); check the new fingerprint with the device's owner, then remove the "
                            f"old key with ssh-keygen -R and connect once with ssh to accept the new one")
    if "Host key verification failed" in stderr or "No ED25519 host key is known" in stderr or \
            "host key is known" in stderr:
        return HostKeyError(f"{name}: unknown host key; sepconv never accepts host keys silently: run `ssh "
                            f"{_ssh_hint(target)}` once, check the fingerprint and answer yes, then retry")
    if "Permission denied" in stderr or "Too many authentication failures" in stderr:
        return AuthenticationError(f"{name}: authentication refused ({last}); check the user name and that your "
                                   f"public key is in the device's ~/.ssh/authorized_keys (ssh-copy-id "
                                   f"{_ssh_hint(target)}); sepconv runs ssh in batch mode, so it cannot ask for a "
                                   f"password")
    for marker in ("Connection refused", "Could not resolve hostname", "timed out", "No route to host",
                   "Network is unreachable", "Connection closed", "Connection reset", "kex_exchange_identification"):
        if marker in stderr:
            return HostUnreachableError(f"{name}: unreachable ({last}); check that the device is on, on the "
                                        f"network, that sshd runs there, and the host name and port")
    if last == "no message":  # a connection killed from the other side: ssh exits 255 and says nothing
        return HostUnreachableError(f"{name}: the connection was closed without a word (sshd stopped, or the device "
                                    f"went away); check the device and retry")
    return RemoteError(f"{name}: ssh failed: {last}")


def _ssh_hint(target: Target) -> str:
    return f"-p {target.port} {target.destination}" if target.port else target.destination


def _last_line(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"
