"""What the lab's agent sees of the host: its own home, nothing of the appliance.

In a real deployment the agent runs on another machine than the appliance: whatever it does,
it cannot open the appliance's database passwords, approvers' client secrets, CA and audit
keys, or its control socket. The lab's namespaces share one filesystem, so every command
the lab runs on the agent node (``tollgate lab exec agent -- …``, :meth:`Lab.exec`,
:meth:`Lab.popen`, the lab's own probes and enrollment) is given a view of its own:

1. a private mount namespace (``unshare --mount``, private propagation: nothing leaks back);
2. an empty tmpfs over the whole lab root (``/run/tollgate-lab``: this lab's appliance
   files and every other lab's) and over any audit directory kept elsewhere;
3. the agent's home bind-mounted back at its usual path (opened before it was covered and
   mounted from that descriptor), so ``~/.postgresql`` and its enrolled certificate work;
4. the command run with a capability bounding set that lacks what would undo the view or
   reach around it: ``CAP_SYS_ADMIN`` (umount, setns into another namespace),
   ``CAP_SYS_PTRACE`` (``/proc/PID/root`` and ``/proc/PID/fd`` of appliance processes, which
   keep their full capabilities), ``CAP_DAC_READ_SEARCH`` (``open_by_handle_at``),
   ``CAP_SYS_CHROOT``, ``CAP_MKNOD``, ``CAP_SYS_RAWIO``, ``CAP_SYS_MODULE``, ``CAP_BPF``,
   ``CAP_NET_ADMIN`` (every network namespace here is owned by the host's user namespace,
   so it would reach any namespace whose process it can name: ``ip link add … peer …
   netns PID`` put a link of the agent's into the gateway's, the database's or the host's
   namespace), ``CAP_IPC_OWNER`` (the IPC namespace is shared), …

Why a mount view and not an unprivileged user: the agent stays root *in its own box*, as an
agent machine's root would be — it keeps ``CAP_NET_RAW`` for the raw-packet attacks the
hardening tests craft from the agent's side (what needs ``CAP_NET_ADMIN`` in the agent's
namespace, such as adding addresses, the lab's operator does with ``ip netns exec``), and
reads the files a test made for
it in a root-owned temporary directory — while the separation the appliance really relies
on, that the agent is *elsewhere*, is what the view models. Nothing is created outside the
namespaces, so there is nothing for ``lab down``/``lab gc`` to remove: the view ends with the
last process that holds it (and ``lab down`` kills every process of the agent namespace).

What it does not model: the agent's root shares the host's pid space and uid 0, so it can
still see and signal the appliance's processes (a denial of service, which the proxy meets
by failing closed), though not read their memory, descriptors or files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

# Capabilities an agent-side command never holds (setpriv's names).
DROPPED_CAPABILITIES = (
    "sys_admin", "sys_ptrace", "dac_read_search", "sys_chroot", "mknod", "sys_rawio", "sys_module",
    "sys_boot", "sys_time", "syslog", "bpf", "perfmon", "checkpoint_restore", "linux_immutable",
    "mac_admin", "mac_override", "audit_control", "audit_read", "setfcap", "sys_pacct", "net_admin", "ipc_owner",
)

# Run by ``sh -euc`` inside the new mount namespace: $1 is the home to keep, $2 the bounding
# set change, $3 how many directories to cover, then those directories, then the command.
_SCRIPT = """\
home=$1; caps=$2; n=$3; shift 3
exec 3<"$home"
while [ "$n" -gt 0 ]; do
    mount -t tmpfs -o mode=0755,size=1m,nosuid,nodev tollgate-agent-view "$1"
    shift; n=$((n - 1))
done
mkdir -p "$home"
mount --no-canonicalize --bind /proc/self/fd/3 "$home"
exec 3<&-
exec setpriv --bounding-set "$caps" -- "$@"
"""


def command(home: Path, hidden: Iterable[Path], argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to run in the agent's view: ``hidden`` covered, ``home`` kept, HOME set.

    Every path in ``hidden`` must be an existing directory; ``home`` may lie inside one.
    """
    covered = [str(p) for p in dict.fromkeys(Path(p) for p in hidden)]
    caps = ",".join(f"-{cap}" for cap in DROPPED_CAPABILITIES)
    return ["unshare", "--mount", "--propagation", "private",
            "env", f"HOME={home}",
            "sh", "-euc", _SCRIPT, "tollgate-agent-view", str(home), caps, str(len(covered)), *covered, *argv]


__all__ = ["DROPPED_CAPABILITIES", "command"]
