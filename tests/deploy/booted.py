"""A Debian 12 host booted with systemd as PID 1, for the deployment test.

``debootstrap`` builds the root filesystem once (cached under build/deploy/ between local
runs; CI has no cache and builds it, which downloads from the host's Debian mirror). Each
test gets a copy, prepared as a gateway (hostname, machine id, root's SSH key, units that
make no sense without hardware masked) and booted by ``unshare --pid --fork --mount --uts
--ipc`` + ``chroot`` inside a network namespace of the test's (systemd-nspawn does not work
on this kernel). The mount namespace is private, so nothing the booted system mounts is
seen outside; powering off (SIGRTMIN+4 to its PID 1, systemd's "poweroff" signal) ends it,
and killing its PID 1 ends every process in its PID namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

# What the gateway has before Ansible arrives: a minimal Debian with systemd, sshd, the
# Python Ansible needs (python3-apt for the apt module) and the Debian packages the role
# installs from "the host's configured repositories" (the booted host has no network to a
# mirror, as an air-gapped gateway has none to the internet).
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv", "python3-apt",
                 "nftables", "iproute2", "procps", "ca-certificates")
SUITE = "bookworm"
# Units that manage hardware, consoles or the host's clock: nothing for them to do in a
# chroot that shares the host's kernel and devices (udev would even replay the host's
# device events), and logind, which needs a session-capable cgroup tree.
MASKED = ("systemd-udevd.service", "systemd-udev-trigger.service", "systemd-udev-settle.service",
          "systemd-udevd-control.socket", "systemd-udevd-kernel.socket", "getty@tty1.service",
          "console-getty.service", "serial-getty@console.service", "systemd-remount-fs.service",
          "systemd-logind.service", "systemd-firstboot.service", "apt-daily.timer", "apt-daily-upgrade.timer",
          "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer", "systemd-timesyncd.service",
          "systemd-hwdb-update.service", "systemd-modules-load.service", "dev-hugepages.mount",
          "dev-mqueue.mount", "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
          "sys-fs-fuse-connections.mount")
# How the booted system's root is entered, in its private mount namespace: bind-mounted
# onto itself, so it is a mount point (systemd's per-service mount namespaces — ProtectSystem=
# and the like — fail with EINVAL on a root that is a plain directory), then made the
# namespace's root with pivot_root before the chroot, so the system is not "in a chroot"
# as the kernel sees it (there, unshare(CLONE_NEWUSER) fails with EPERM, and with it every
# unit with PrivateUsers=). The old root is detached (umount reads /proc to find it).
_ENTER_ROOT = ('mount --rbind "$0" "$0" && cd "$0" && mkdir -p .host && pivot_root . .host && '
               'exec chroot . /bin/sh -c "mount -t proc proc /proc && umount -l /.host && rmdir /.host && '
               'umount /proc && exec /lib/systemd/systemd"')
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 180.0  # safety nets only: a host that never comes up fails, it is not a measure
STOP_TIMEOUT = 90.0


class BootError(Exception):
    """The root filesystem could not be built, or the host did not boot."""


def base_rootfs(build_dir: Path) -> Path:
    """The debootstrapped root filesystem, built once and kept under ``build_dir``."""
    base = build_dir / "deploy" / "debian12-base"
    stamp = base / ".tollgate-base"
    wanted = f"{SUITE} minbase {','.join(BASE_PACKAGES)}\n"
    if stamp.is_file() and stamp.read_text() == wanted:
        return base
    partial = base.with_name(base.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE,
                             str(partial)], capture_output=True, text=True, check=False, timeout=1200)
    if result.returncode != 0:
        raise BootError(f"debootstrap failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    (partial / ".tollgate-base").write_text(wanted)
    partial.rename(base)
    return base


def prepare_rootfs(base: Path, root: Path, *, hostname: str, authorized_key: str) -> None:
    """A bootable copy of ``base`` at ``root``: root logs in over SSH with ``authorized_key``."""
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True, timeout=600)
    (root / "etc/hostname").write_text(hostname + "\n")
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n::1 localhost\n")
    (root / "etc/machine-id").write_text("")
    subprocess.run(["systemd-machine-id-setup", f"--root={root}"], check=True, capture_output=True, timeout=60)
    ssh = root / "root/.ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "authorized_keys").write_text(authorized_key)
    os.chmod(ssh / "authorized_keys", 0o600)
    (root / "etc/ssh/sshd_config.d/tollgate-test.conf").write_text("PermitRootLogin prohibit-password\nUseDNS no\n")
    for unit in MASKED:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")


def host_key(root: Path) -> str:
    """The booted host's SSH host key (ed25519), for the controller's known_hosts."""
    return (root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[1]


class BootedHost:
    """systemd as PID 1 of a chroot at ``root``, in network namespace ``netns``."""

    def __init__(self, root: Path, netns: str, console_log: Path):
        self.root = root
        self.netns = netns
        self.console_log = console_log
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None

    def boot(self) -> None:
        with open(self.console_log, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork", "--mount", "--uts", "--ipc",
                 "--mount-proc", "/bin/sh", "-c", _ENTER_ROOT, str(self.root)],
                env={"PATH": PATH, "container": "tollgate-test"}, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.pid1 = self._find_pid1()
        # systemctl talks to the manager on its private socket, which exists once the
        # manager is up (seen through the booted system's own mount namespace).
        self._wait_for(lambda: Path(f"/proc/{self.pid1}/root/run/systemd/private").exists(),
                       "systemd's private socket")
        state = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=BOOT_TIMEOUT)
        if state.stdout.strip() not in ("running", "degraded"):
            failed = self.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
            raise BootError(f"the host did not come up: {state.stdout.strip()!r}; failed units:\n{failed}")

    def _find_pid1(self) -> int:
        """The booted systemd: unshare's forked child once it has exec'd systemd."""
        found: list[int] = []

        def started() -> bool:
            for pid in _descendants(self.proc.pid):  # type: ignore[union-attr]
                # PID 1 of its own PID namespace, and already systemd (not the shell before it).
                if _namespace_pid(pid) == 1 and _comm(pid) == "systemd":
                    found.append(pid)
                    return True
            return False

        self._wait_for(started, "systemd as PID 1")
        return found[0]

    def _wait_for(self, condition: Callable[[], bool], what: str) -> None:
        """Poll for something that happens inside the booted system and sends no event out
        of it (a process exec'd, a socket bound); bounded by BOOT_TIMEOUT as a safety net."""
        assert self.proc is not None
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not condition():
            if self.proc.poll() is not None:
                raise BootError(f"the host's init exited ({self.proc.returncode}) before {what}; "
                                f"see {self.console_log}")
            if time.monotonic() > deadline:
                raise BootError(f"no {what} after {BOOT_TIMEOUT:.0f}s")
            time.sleep(0.05)

    def run(self, argv: list[str], *, check: bool = True, timeout: float = 300.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the booted host (its namespaces and root), as root."""
        assert self.pid1 is not None, "not booted"
        result = subprocess.run(["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-n", "-p", "-r", "-w",
                                 "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", *argv],
                                capture_output=True, text=True, check=False, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} failed ({result.returncode}) in the booted host:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def poweroff(self) -> None:
        """Shut down cleanly (systemd's SIGRTMIN+4), else kill the PID namespace."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self.pid1 is not None:
            try:
                os.kill(self.pid1, signal.SIGRTMIN + 4)
                self.proc.wait(STOP_TIMEOUT)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill()
        self.kill()
        self.proc = None
        self.pid1 = None

    def kill(self) -> None:
        """Killing a PID namespace's init kills everything in it. (systemd makes itself a
        session leader, so killing unshare's process group would not reach it.)"""
        if self.proc is None:
            return
        inits = {self.pid1} if self.pid1 is not None else set()
        inits.update(pid for pid in _descendants(self.proc.pid) if _namespace_pid(pid) == 1)
        for pid in inits:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            out.append(int(child))
            stack.append(int(child))
    return out


def _namespace_pid(pid: int) -> int | None:
    """``pid`` as its innermost PID namespace numbers it (NSpid's last field)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
