"""The user's OpenSSH client, driven safely: batch mode, connection reuse, timeouts, and one-line errors.

sepconv speaks to a device through `ssh` exactly as the user would, so their `~/.ssh/config` (aliases,
users, ports, jump hosts), keys, agent and `known_hosts` all apply. Three rules hold everywhere:

- **Host keys are never accepted silently.** No `StrictHostKeyChecking=no`, no `accept-new`: an unknown or changed
  host key stops the run with a message that says how to check and accept it.
- **No user string reaches a shell unquoted.** A remote command is an argument list joined with `shlex.join`, the
  only form the remote shell receives; scripts go through standard input.
- Files are streamed through the same connection (`cat > tmp && mv`), so no remote path is ever parsed by scp.
- **Batch mode**: ssh never prompts (there may be no terminal), so a missing key is an error, not a hang.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sepconv.deploy.errors import (AuthenticationError, HostKeyError, HostUnreachableError, InvalidOptionError,
                                   RemoteError)

SSH_FAILED = 255  # ssh's own exit status for connection and authentication failures


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
        raise InvalidOptionError(f"Unrecognized host {spec!r}. Use what you would type after ssh: an alias, host, "
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
        self._control_dir = tempfile.mkdtemp(prefix="sepconv-ssh-") if options.reuse else None

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
            check: bool = True) -> subprocess.CompletedProcess:
        """Run `argv` on the device (quoted for its shell); raise a one-line error if ssh itself failed."""
        command = shlex.join(str(a) for a in argv)
        port = ["-p", str(self.target.port)] if self.target.port else []
        try:
            done = subprocess.run(["ssh", *self._common(), *port, "-T", "--", self.target.destination, command],
                                  input=stdin if stdin is not None else b"", capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{self.target.label}: `{argv[0]}` did not finish within {timeout:.0f} s; the device "
                              f"is overloaded or stuck (raise --timeout, or check it with ssh)") from None
        except FileNotFoundError:
            raise RemoteError("the OpenSSH client (ssh) is not installed here; install it (apt install "
                              "openssh-client)") from None
        if done.returncode == SSH_FAILED:
            raise classify_ssh_failure(self.target, done.stderr.decode(errors="replace"))
        if check and done.returncode != 0:
            raise RemoteError(f"{self.target.label}: `{command[:120]}` failed with status {done.returncode}: "
                              f"{_last_line(done.stderr)}")
        return done

    def put(self, source: Path | bytes, remote: str, *, timeout: float | None = 600) -> None:
        """Copy a local file (or bytes) to `remote` on the device: streamed through ssh into a temporary name, then
        renamed, so the device never holds a half-written file under the final name. Paths are quoted, whatever they
        contain."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        partial = f"{remote}.partial"
        self.run(["sh", "-c", 'cat > "$1" && mv -f "$1" "$2"', "sh", partial, remote], stdin=data, timeout=timeout)


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
