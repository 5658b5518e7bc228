"""An emulated Raspberry Pi on this machine: an arm64 Debian bookworm userland (the base of Raspberry Pi OS, Python 3.11)
run with qemu-user-static through binfmt_misc, with an sshd inside on a loopback port.

    scripts/pi-emulator start [--dir build/pi-emulator] [--port N] [--json]   build (cached) and start
    scripts/pi-emulator stop  [--dir build/pi-emulator]                        stop everything it runs, unmount
    scripts/pi-emulator status [--dir build/pi-emulator]

The fast route (about a minute the first time): `debootstrap --foreign` downloads and unpacks the base; every .deb it
fetched (python3, python3-venv, openssh-server among them) is unpacked with `dpkg-deb -x` instead of running the
second stage under emulation; aarch64 wheels of the runtimes are downloaded with the host's pip for
`deploy-model --wheels`. LiteRT and ONNX Runtime crash under qemu 7.2 unless /proc/cpuinfo looks like an arm64 CPU, so
a Cortex-A72 (Raspberry Pi 4) cpuinfo is bind-mounted over it; /dev, /proc and /sys are mounted for sshd. The client
side gets its own key, known_hosts and an ssh_config with the alias `sepconv-pi`. Needs root (chroot, mount) and
Debian's qemu-user-static and debootstrap (`scripts/setup --for-tests` installs them). Emulated timings are
meaningless, and the userland has no CA certificates: install with `deploy-model --wheels DIR/wheels`.

`stop` ends everything the emulator runs: the sshd listener (its own process group) and every process whose root
directory is the emulated userland - the sessions sshd forked (each in a session of its own, so a signal to the
listener's group misses them) and whatever they started (a benchmark, pip) - then unmounts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ALIAS = "sepconv-pi"
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
INCLUDE = "python3,python3-venv,openssh-server"
QEMU = "/usr/bin/qemu-aarch64-static"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_ENTRY = (r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
                r":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
                f":{QEMU}:F")
WHEELS = ("ai-edge-litert==2.3.0", "onnxruntime==1.32.0", "numpy==2.4.6", "tabulate")
PLATFORMS = ("manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux_2_27_aarch64", "manylinux_2_28_aarch64")
CORTEX_A72 = "".join(f"""processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

""" for n in range(4)) + "Hardware\t: BCM2835\nRevision\t: d03115\nModel\t\t: {model}\n"
PI_MODEL = "Raspberry Pi 4 Model B Rev 1.5 (emulated by qemu-aarch64: timings are meaningless)"
SSHD_CONFIG = """Port {port}
ListenAddress 127.0.0.1
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile /run/sshd-sepconv.pid
AuthorizedKeysFile /etc/ssh/sepconv_authorized_keys
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
PrintMotd no
LogLevel ERROR
Subsystem sftp internal-sftp
"""


class EmulatorError(Exception):
    pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pi-emulator", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--dir", type=Path, default=Path("build/pi-emulator"), help="(default: %(default)s)")
    parser.add_argument("--port", type=int, help="sshd port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--json", action="store_true", help="print the connection details as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            info = start(args.dir.resolve(), args.port)
            print(json.dumps(info, indent=2) if args.json else start_message(info))
        elif args.command == "stop":
            stop(args.dir.resolve())
        else:
            print(status(args.dir.resolve()))
    except EmulatorError as error:
        print(f"pi-emulator: error: {error}", file=sys.stderr)
        return 1
    return 0


def start_message(info: dict) -> str:
    """What to type next: the deploy-model line that works (its own ssh_config; --wheels, the userland has no CA
    certificates for the package index), and ssh for a look around."""
    return "\n".join([
        f"emulated Raspberry Pi (arm64 under qemu; timings are meaningless) on 127.0.0.1:{info['port']}",
        f"  deploy-model {ALIAS} MODEL.tflite --ssh-config {info['ssh_config']} --wheels {info['wheels']}",
        f"  ssh -F {info['ssh_config']} {ALIAS}",
        "  stop: scripts/pi-emulator stop"])


def start(folder: Path, port: int | None) -> dict:
    if os.geteuid() != 0:
        raise EmulatorError("needs root (chroot and mount); run it as root (CI does)")
    if (folder / "state.json").exists():
        stop(folder)
    rootfs = folder / "rootfs"
    register_binfmt()
    if not (rootfs / ".sepconv-ready").exists():
        build_rootfs(folder, rootfs)
    wheels = download_wheels(folder / "wheels")
    keys = client_keys(folder, rootfs)
    port = port or free_port()
    (rootfs / "etc/ssh/sshd_sepconv").write_text(SSHD_CONFIG.format(port=port))
    (rootfs / "etc/sepconv-emulated").write_text("qemu-user: deploy-model's probe reports emulated\n")
    mounts = mount_all(folder, rootfs)
    process = subprocess.Popen(["chroot", str(rootfs), "/usr/sbin/sshd", "-D", "-f", "/etc/ssh/sshd_sepconv",
                                "-E", "/var/log/sshd-sepconv.log"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = {"pid": process.pid, "port": port, "alias": ALIAS, "rootfs": str(rootfs), "mounts": mounts,
             "wheels": str(wheels), "ssh_config": str(keys["config"]), "known_hosts": str(keys["known_hosts"]),
             "identity": str(keys["identity"]), "pi_model": PI_MODEL}
    (folder / "state.json").write_text(json.dumps(state, indent=2))
    wait_for_port(port, process, rootfs)
    return state


def register_binfmt() -> None:
    """aarch64 ELF files run through qemu-aarch64-static ('F': the interpreter is opened now, so chroots see it)."""
    if not Path(QEMU).exists():
        raise EmulatorError(f"{QEMU} is missing; install Debian's qemu-user-static "
                            f"(scripts/setup --for-tests does)")
    if not (BINFMT / "register").exists():
        done = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise EmulatorError(f"cannot mount binfmt_misc ({done.stderr.strip()}); this machine cannot run aarch64 "
                                f"programs under qemu-user")
    if not (BINFMT / "qemu-aarch64").exists():
        (BINFMT / "register").write_text(BINFMT_ENTRY)
    if "enabled" not in (BINFMT / "qemu-aarch64").read_text():
        (BINFMT / "qemu-aarch64").write_text("1")


def build_rootfs(folder: Path, rootfs: Path) -> None:
    if not shutil.which("debootstrap"):
        raise EmulatorError("debootstrap is missing; install Debian's debootstrap "
                            "(scripts/setup --for-tests does)")
    shutil.rmtree(rootfs, ignore_errors=True)
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    log = folder / "debootstrap.log"
    with open(log, "w") as out:
        done = subprocess.run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", f"--include={INCLUDE}",
                               SUITE, str(rootfs), MIRROR], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise EmulatorError(f"debootstrap failed (log: {log}): {log.read_text().strip().splitlines()[-1]}")
    for deb in sorted((rootfs / "var/cache/apt/archives").glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(rootfs)], check=True)
    shutil.copy(rootfs / "usr/share/base-passwd/passwd.master", rootfs / "etc/passwd")
    shutil.copy(rootfs / "usr/share/base-passwd/group.master", rootfs / "etc/group")
    with open(rootfs / "etc/passwd", "a") as passwd:
        passwd.write("sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n")
    (rootfs / "etc/shadow").write_text("root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n")
    for path in ("run/sshd", "root", "proc", "dev", "sys", "tmp"):
        (rootfs / path).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(rootfs / "etc/ssh/ssh_host_ed25519_key")],
                   check=True)
    check = subprocess.run(["chroot", str(rootfs), "/usr/bin/python3", "-c",
                            "import platform; print(platform.machine())"], capture_output=True, text=True)
    if check.stdout.strip() != "aarch64":
        raise EmulatorError(f"the arm64 userland does not run under qemu: {check.stderr.strip()[-300:]}")
    (rootfs / ".sepconv-ready").write_text("ok\n")


def download_wheels(folder: Path) -> Path:
    """aarch64 CPython 3.11 wheels of the runtimes, with the host's pip (for deploy-model --wheels)."""
    if (folder / ".complete").exists():
        return folder
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                           "--only-binary=:all:", *platforms, "--python-version", "3.11", "--implementation", "cp",
                           "-d", str(folder), *WHEELS], capture_output=True, text=True)
    if done.returncode != 0:
        raise EmulatorError(f"downloading aarch64 wheels failed: {done.stderr.strip().splitlines()[-1]}")
    (folder / ".complete").write_text("ok\n")
    return folder


def client_keys(folder: Path, rootfs: Path) -> dict:
    identity = folder / "client_key"
    if not identity.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sepconv-pi-emulator", "-f",
                        str(identity)], check=True)
    shutil.copy(f"{identity}.pub", rootfs / "etc/ssh/sepconv_authorized_keys")
    return {"identity": identity, "known_hosts": folder / "known_hosts", "config": folder / "ssh_config"}


def mount_all(folder: Path, rootfs: Path) -> list[str]:
    cpuinfo = folder / "cpuinfo"
    cpuinfo.write_text(CORTEX_A72.replace("{model}", PI_MODEL))
    steps = [(["mount", "-t", "proc", "proc", str(rootfs / "proc")], rootfs / "proc"),
             (["mount", "--bind", str(cpuinfo), str(rootfs / "proc/cpuinfo")], rootfs / "proc/cpuinfo"),
             (["mount", "--bind", "/dev", str(rootfs / "dev")], rootfs / "dev"),
             (["mount", "--bind", "/sys", str(rootfs / "sys")], rootfs / "sys")]
    done = []
    for command, target in steps:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            unmount(done)
            raise EmulatorError(f"{' '.join(command)} failed: {result.stderr.strip()}")
        done.append(str(target))
    return done


def wait_for_port(port: int, process: subprocess.Popen, rootfs: Path) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        if process.poll() is not None:
            log = rootfs / "var/log/sshd-sepconv.log"
            raise EmulatorError(f"sshd in the emulated Pi exited ({process.returncode}): "
                                f"{log.read_text()[-500:] if log.exists() else 'no log'}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                write_client_config(rootfs, port)
                return
        time.sleep(0.2)
    raise EmulatorError(f"sshd in the emulated Pi did not listen on port {port} within 60 s")


def write_client_config(rootfs: Path, port: int) -> None:
    folder = rootfs.parent
    public = (rootfs / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {public[0]} {public[1]}\n")
    (folder / "ssh_config").write_text("\n".join([
        f"Host {ALIAS}", "  HostName 127.0.0.1", f"  Port {port}", "  User root",
        f"  IdentityFile {folder / 'client_key'}", "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {folder / 'known_hosts'}", "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes", "  LogLevel ERROR", ""]))


def stop(folder: Path) -> None:
    """Stop the listener and every process running in the emulated userland (sessions, benchmarks), then unmount."""
    state_file = folder / "state.json"
    if not state_file.exists():
        return
    state = json.loads(state_file.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.killpg(state["pid"], signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [state["pid"], *inside(Path(state["rootfs"]))]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.time() + 10
        while time.time() < deadline and (_alive(state["pid"]) or inside(Path(state["rootfs"]))):
            time.sleep(0.1)
    unmount(state["mounts"])
    state_file.unlink()


def inside(rootfs: Path) -> list[int]:
    """PIDs of the processes whose root directory is `rootfs` (chrooted there: all the emulator runs)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "root") == str(rootfs):
                    found.append(int(entry.name))
    return found


def status(folder: Path) -> str:
    state = folder / "state.json"
    if state.exists():
        return state.read_text()
    rootfs = folder / "rootfs"
    left = inside(rootfs.resolve()) if rootfs.exists() else []
    return f"not running, but {len(left)} process(es) still run in {rootfs}: {left}" if left else "not running"


def unmount(mounts: list[str]) -> None:
    for target in reversed(mounts):
        subprocess.run(["umount", "-l", target], capture_output=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        waited = os.waitpid(pid, os.WNOHANG)
        return waited == (0, 0)
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists()
    except ProcessLookupError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
