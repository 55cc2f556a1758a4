"""Two "hosts" on one machine for multi-host MPI tests: network namespaces joined by a veth
pair, each with its own host name (a UTS namespace), and MPICH's launcher reaching the second
through a stand-in for ssh that enters its namespace.

    with TwoHosts(tmp_path) as hosts:          # TwoHosts.unavailable() says why it cannot be
        subprocess.run(hosts.mpiexec(MPIEXEC, [python, ...]))
        hosts.link_down()                      # host-b drops off the network

Ranks talk over TCP only (UCX_TLS=tcp): on one machine MPI would otherwise use shared memory,
which no network fault reaches.
"""
import os
import pathlib
import shutil
import signal
import subprocess
import time

LAUNCHER = """#!/bin/sh
# what MPICH's ssh launcher runs: -x HOST COMMAND
[ "$1" = -x ] && shift
host=$1; shift
case $host in {a_ip}) ns={a}; name=host-a;; {b_ip}) ns={b}; name=host-b;; *) exit 255;; esac
exec ip netns exec $ns unshare --uts sh -c "hostname $name && exec $*"
"""


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True)


class TwoHosts:
    """host-a (where mpiexec runs) and host-b, at 10.211.N.1 and .2."""

    def __init__(self, directory):
        tag = os.getpid() % 100000
        self.a, self.b = f"msft{tag}a", f"msft{tag}b"
        subnet = f"10.211.{tag % 250}"
        self.a_ip, self.b_ip = f"{subnet}.1", f"{subnet}.2"
        self.b_link = f"ms{tag}b"
        self.launcher = pathlib.Path(directory) / "launch-in-namespace"

    @staticmethod
    def unavailable():
        """Why namespaces cannot be made here, or None."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        missing = [tool for tool in ("ip", "unshare") if not shutil.which(tool)]
        if missing:
            return f"no {' or '.join(missing)} on PATH"
        probe = f"msftprobe{os.getpid()}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode:
            return f"cannot make a network namespace: {made.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def __enter__(self):
        try:
            for name in (self.a, self.b):
                _ip("netns", "add", name)
                _ip("-n", name, "link", "set", "lo", "up")
            _ip("link", "add", f"ms{self.a[4:]}", "netns", self.a, "type", "veth", "peer", "name", self.b_link,
                "netns", self.b)
            for name, link, address in ((self.a, f"ms{self.a[4:]}", self.a_ip), (self.b, self.b_link, self.b_ip)):
                _ip("-n", name, "addr", "add", f"{address}/24", "dev", link)
                _ip("-n", name, "link", "set", link, "up")
            self._wait_until_up((self.a, f"ms{self.a[4:]}"), (self.b, self.b_link))
        except BaseException:
            self.__exit__()
            raise
        self.launcher.write_text(LAUNCHER.format(a=self.a, b=self.b, a_ip=self.a_ip, b_ip=self.b_ip))
        self.launcher.chmod(0o755)
        return self

    @staticmethod
    def _wait_until_up(*links, seconds=10):
        """Until each (namespace, link) is UP: a rank started before would see loopback alone."""
        end = time.monotonic() + seconds
        while not all("state UP" in _ip("-n", name, "link", "show", "dev", link).stdout for name, link in links):
            if time.monotonic() > end:
                raise RuntimeError(f"the veth pair did not come up in {seconds} s")
            time.sleep(0.05)

    def mpiexec(self, mpiexec, command):
        """The command line that runs `command` as rank 0 on host-a and rank 1 on host-b."""
        return ["ip", "netns", "exec", self.a, "unshare", "--uts", "sh", "-c", 'hostname host-a && exec "$@"', "sh",
                mpiexec, "-launcher", "ssh", "-launcher-exec", str(self.launcher), "-hosts", f"{self.a_ip},{self.b_ip}",
                "-n", "2", "-ppn", "1", "-genv", "UCX_TLS", "tcp,self", "-genv", "FI_PROVIDER", "tcp", *command]

    def link_down(self):
        _ip("-n", self.b, "link", "set", self.b_link, "down")

    def processes(self, name):
        """{pid: command line} of the processes in namespace `name`."""
        found = {}
        for pid in _ip("netns", "pids", name).stdout.split():
            try:
                found[int(pid)] = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # ended meanwhile
                pass
        return found

    def __exit__(self, *exc):
        for name in (self.a, self.b):
            try:
                for pid in self.processes(name):
                    os.kill(pid, signal.SIGKILL)
            except (subprocess.CalledProcessError, OSError):
                pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
