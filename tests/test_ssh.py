"""The SSH layer against a real OpenSSH server on 127.0.0.1 (tests/sshd.py): errors, quoting, connection reuse."""

import os
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from sepconv.deploy.errors import (AuthenticationError, HostKeyError, HostUnreachableError, InvalidOptionError,
                                   RemoteError)
from sepconv.deploy.ssh import SOCKET_PATH_LIMIT, Connection, SshOptions, parse_target
from sshd import ALIAS, LoopbackSshd, base_python, processes_mentioning, wait_until_none_mention

NASTY = "a b'c\"d;e $(touch PWNED) `x` &|<>*?.txt"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = LoopbackSshd(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


def connect(config, **kwargs):
    return Connection(parse_target(ALIAS), SshOptions(config=str(config), **kwargs))


@pytest.mark.parametrize("spec, destination, port", [
    ("pi@raspberrypi.local", "pi@raspberrypi.local", None), ("pi@raspberrypi.local:2222", "pi@raspberrypi.local", 2222),
    ("myalias", "myalias", None), ("host:22", "host", 22), ("pi@[fe80::1]:2200", "pi@fe80::1", 2200),
    ("10.0.0.7", "10.0.0.7", None),
])
def test_targets_parse_as_ssh_would_take_them(spec, destination, port):
    target = parse_target(spec)
    assert (target.destination, target.port, target.label) == (destination, port, spec)


@pytest.mark.parametrize("spec", ["", "-oProxyCommand=evil", "pi@host name", "host:99999"])
def test_bad_targets_are_refused(spec):
    with pytest.raises(InvalidOptionError):
        parse_target(spec)


def test_commands_and_files_are_quoted_whatever_they_contain(sshd, tmp_path):
    with connect(sshd.client_config()) as conn:
        target = tmp_path / NASTY
        conn.put(b"payload", str(target))
        assert target.read_bytes() == b"payload"
        assert not (tmp_path / f"{NASTY}.partial").exists(), "the temporary name is renamed away"
        done = conn.run(["cat", str(target)])
        assert done.stdout == b"payload"
        echoed = conn.run(["printf", "%s", NASTY]).stdout.decode()
        assert echoed == NASTY, "every argument reaches the remote program as one literal word"
    assert not list(Path.home().glob("PWNED")) and not list(tmp_path.glob("PWNED")), "nothing was executed"


def test_one_connection_is_reused(sshd):
    with connect(sshd.client_config()) as conn:
        conn.run(["true"])
        sockets = list(Path(conn._control_dir).iterdir())
        assert len(sockets) == 1, "a ControlMaster socket serves the following commands"
        for _ in range(3):
            conn.run(["true"])
        assert list(Path(conn._control_dir).iterdir()) == sockets
        folder = conn._control_dir
    assert not Path(folder).exists(), "closing removes the master and its socket folder"


def test_unknown_host_key_stops_with_how_to_accept_it(sshd):
    config = sshd.client_config("unknown_key", known_hosts=sshd.empty_known_hosts)
    with pytest.raises(HostKeyError, match=r"unknown host key; sepconv never accepts host keys silently: run `ssh "
                                           r"sepconv-test` once"):
        with connect(config) as conn:
            conn.run(["true"])
    assert sshd.empty_known_hosts.read_text() == "", "the key must not have been added"


def test_changed_host_key_is_named(sshd, tmp_path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    with pytest.raises(HostKeyError, match="has CHANGED"):
        with connect(sshd.client_config("changed_key", known_hosts=known)) as conn:
            conn.run(["true"])


def test_refused_authentication_is_named(sshd, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with pytest.raises(AuthenticationError, match="authentication refused .*authorized_keys .*batch mode"):
        with connect(sshd.client_config("stranger", key=stranger)) as conn:
            conn.run(["true"])


def test_unreachable_host_is_named(tmp_path):
    server = LoopbackSshd(tmp_path / "gone")  # configured, never started: nothing listens on its port
    with pytest.raises(HostUnreachableError, match=r"unreachable \(.*Connection refused\)"):
        with connect(server.client_config(), connect_timeout=3) as conn:
            conn.run(["true"])


def test_remote_failure_and_timeout_are_one_line(sshd):
    with connect(sshd.client_config()) as conn:
        with pytest.raises(RemoteError, match="failed with status 3: boom"):
            conn.run(["sh", "-c", "echo boom >&2; exit 3"])
        with pytest.raises(RemoteError, match="did not finish within 1 s"):
            conn.run(["sleep", "5"], timeout=1)


def test_control_socket_path_fits_macos_limit_under_a_deep_temporary_folder(sshd, tmp_path, monkeypatch):
    """macOS's $TMPDIR (/var/folders/xx/.../T/) made the socket path ~127 bytes; a Unix socket path holds 104 there,
    and ssh first binds it under a name 17 bytes longer."""
    deep = tmp_path / ("deep-" * 14)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with connect(sshd.client_config()) as conn:
        assert conn.run(["echo", "ok"]).stdout == b"ok\n"
        sockets = list(Path(conn._control_dir).iterdir())
        assert len(sockets) == 1
        assert len(os.fsencode(str(sockets[0]))) + 17 < SOCKET_PATH_LIMIT, sockets[0]


def test_the_loopback_device_runs_the_python_the_test_chose_in_a_userland_of_its_own(sshd):
    """Not the host user's login environment: no rc file of theirs ran (root's ~/.bashrc ran `pyenv init`, whose
    rehash lock made every remote python3 wait 60 s), python3 is the chosen interpreter, HOME is the device's."""
    script = 'command -v python3; pwd; echo "$HOME"; env | grep -c "^PYENV" || true'
    with connect(sshd.client_config()) as conn:
        python3, cwd, home, pyenv_variables = conn.run(["sh", "-c", script]).stdout.decode().split()
        executable = conn.run(["python3", "-c", "import os, sys; print(os.path.realpath(sys.executable))"])
    assert python3 == str(sshd.device_bin / "python3") and Path(executable.stdout.decode().strip()) == base_python()
    assert cwd == home == str(sshd.device_home), "the device's home is its own, and sessions start there"
    assert pyenv_variables == "0", "the host user's shell start-up files did not run"


SLEEPER = ["python3", "-c", "import sys, time; time.sleep(600)"]


def test_aborted_remote_step_is_killed_on_the_device(sshd):
    """Ctrl-C in deploy-model calls abort(): the ssh client dies, and the watchdog on the device kills the program
    (before, the remote program ran on to its end)."""
    marker = f"sepconv-abort-{uuid.uuid4().hex}"
    errors = []
    files_before = sshd.device_files()
    with connect(sshd.client_config()) as conn:
        def step():
            try:
                conn.run([*SLEEPER, marker], watch=True, timeout=900)
            except RemoteError as error:
                errors.append(error)

        worker = threading.Thread(target=step)
        worker.start()
        deadline = time.time() + 60
        while time.time() < deadline and not processes_mentioning(marker):
            time.sleep(0.1)
        assert processes_mentioning(marker), "the remote program started"
        conn.abort()
        worker.join(timeout=60)
        assert not worker.is_alive(), "the step returned instead of waiting for the remote program"
        assert errors and "stopped" in str(errors[0])
        with pytest.raises(RemoteError, match="stopped"):
            conn.run(["true"])
    assert wait_until_none_mention(marker) == [], "the remote program was killed with its session"
    sshd.assert_left_nothing(files_before)


def test_timed_out_remote_step_is_killed_on_the_device(sshd):
    marker = f"sepconv-timeout-{uuid.uuid4().hex}"
    files_before = sshd.device_files()
    with connect(sshd.client_config()) as conn:
        with pytest.raises(RemoteError, match="did not finish within 2 s"):
            conn.run([*SLEEPER, marker], watch=True, timeout=2)
        assert conn.run(["echo", "still usable"]).stdout == b"still usable\n"
    assert wait_until_none_mention(marker) == [], "a timed-out step does not keep running on the device"
    sshd.assert_left_nothing(files_before)


def test_watched_step_streams_stderr_and_keeps_status_and_stdout(sshd):
    lines = []
    with connect(sshd.client_config()) as conn:
        done = conn.run(["sh", "-c", "echo one >&2; echo out; echo two >&2; exit 4"], watch=True, check=False,
                        on_stderr=lines.append)
    assert (done.returncode, done.stdout, lines) == (4, b"out\n", ["one", "two"])
