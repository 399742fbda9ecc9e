"""Two hosts on one machine that share nothing but a network: the multi-host tests' cluster.

Each host is a Linux network namespace with its own address on one veth pair (a private /24 that
exists only inside the two namespaces), and every process of a host runs in its own mount
namespace where:

* `HOST_ROOT` is the host's own directory (`<base>/a` or `<base>/b` seen from outside): the same
  path names different files on the two hosts, so a path written on one host does not exist on
  the other (each host gets its own copy of the data it should have, as a real host would);
* `/dev/shm` is a fresh tmpfs (no shared-memory file crosses hosts), and `TMPDIR` points into the
  host's directory (no temporary file does either).

Everything is created by `TwoHosts.start()` and removed by `close()`: the processes (each started
in its own process group, stopped by group), the mounts (they live only in the hosts' mount
namespaces, which end with their processes), the namespaces and the veth pair. Needs root
(`CAP_SYS_ADMIN` and `CAP_NET_ADMIN`); `unavailable()` says why not where it cannot run.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def _sh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why two namespaced hosts cannot be made here, or None where they can."""
    if os.geteuid() != 0:
        return "network and mount namespaces need root (this test runs as uid %d)" % os.geteuid()
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command is missing (iproute2 / util-linux)"
    name = f"docrl-probe-{os.getpid()}"
    made = _sh("ip", "netns", "add", name)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _sh("ip", "netns", "del", name)
    probe = _sh("unshare", "--mount", "--propagation", "private", "--", "mount", "-t", "tmpfs", "tmpfs", "/mnt")
    if probe.returncode:
        return f"a private mount namespace cannot be made: {probe.stderr.strip()}"
    return None


@dataclass
class Host:
    name: str  # "a" or "b"
    netns: str
    ip: str
    dir: Path  # the host's private directory, as seen from outside the hosts
    procs: list[subprocess.Popen] = field(default_factory=list)


class TwoHosts:
    """`with TwoHosts() as hosts:` ... `hosts.a.ip`, `hosts.spawn(hosts.b, argv)`, `hosts.root`."""

    def __init__(self, subnet_octet: int | None = None):
        tag = f"{os.getpid() % 100000}"
        # 10.231.X.0/24, X from the pid: two sessions on one machine do not collide
        octet = subnet_octet if subnet_octet is not None else 16 + os.getpid() % 200
        self.base = Path(tempfile.mkdtemp(prefix="dh", dir="/tmp"))  # short: Ray's socket paths are length-limited
        self.root = self.base / "host"  # HOST_ROOT: the same path on both hosts, different files
        self.root.mkdir()
        self.veth = (f"dha{tag}", f"dhb{tag}")
        self.a = Host("a", f"docrl-{tag}-a", f"10.231.{octet}.1", self.base / "a")
        self.b = Host("b", f"docrl-{tag}-b", f"10.231.{octet}.2", self.base / "b")
        self._made: list[str] = []

    # -- set-up and tear-down ------------------------------------------------------------------

    def start(self) -> TwoHosts:
        for host, veth in zip((self.a, self.b), self.veth):
            host.dir.mkdir()
            (host.dir / "tmp").mkdir()
            self._run("ip", "netns", "add", host.netns)
            self._made.append(host.netns)
        self._run("ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for host, veth in zip((self.a, self.b), self.veth):
            self._run("ip", "link", "set", veth, "netns", host.netns)
            self._in(host, "ip", "addr", "add", f"{host.ip}/24", "dev", veth)
            self._in(host, "ip", "link", "set", veth, "up")
            self._in(host, "ip", "link", "set", "lo", "up")
        return self

    def close(self) -> None:
        for host in (self.a, self.b):
            for proc in host.procs:
                self.stop(proc, wait_s=5)
        for netns in self._made:  # deleting a namespace deletes the veth end in it, and so the pair
            _sh("ip", "netns", "del", netns)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> TwoHosts:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running on a host ---------------------------------------------------------------------

    def env(self, host: Host, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_USAGE_STATS_ENABLED"}
        env.update(TMPDIR=str(self.root / "tmp"), RAY_USAGE_STATS_ENABLED="0", **extra)
        return env

    def command(self, host: Host, argv: list[str]) -> list[str]:
        """`argv` run on `host`: in its network namespace, with its private mounts."""
        other = self.b if host is self.a else self.a
        setup = (f"mount --bind {shlex.quote(str(host.dir))} {shlex.quote(str(self.root))} && "
                 f"mount -t tmpfs -o size=64m tmpfs {shlex.quote(str(other.dir))} && "
                 "mount -t tmpfs -o size=2g tmpfs /dev/shm && exec \"$@\"")
        return ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", setup, "host-" + host.name, *argv]

    def spawn(self, host: Host, argv: list[str], *, env: dict | None = None, log: Path | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen:
        """Start `argv` on `host` in a new process group (stopped by `stop` or `close`)."""
        out = open(log, "ab") if log else subprocess.DEVNULL
        proc = subprocess.Popen(self.command(host, argv), env=env or self.env(host), cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        host.procs.append(proc)
        return proc

    def run(self, host: Host, argv: list[str], *, env: dict | None = None, timeout: float = 120,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv), env=env or self.env(host), cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, start_new_session=True)

    @staticmethod
    def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 15) -> None:
        """Stop `proc`'s process group: `sig`, then SIGKILL for what is left after `wait_s`."""
        for s in (sig, signal.SIGKILL):
            try:
                os.killpg(proc.pid, s)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                proc.poll()  # reap the group's leader, or the group never empties
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.2)

    # -- helpers -------------------------------------------------------------------------------

    def _in(self, host: Host, *argv: str) -> None:
        self._run("ip", "netns", "exec", host.netns, *argv)

    @staticmethod
    def _run(*argv: str) -> None:
        done = _sh(*argv)
        if done.returncode:
            raise RuntimeError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")


class RayOnTwoHosts:
    """The Ray head on host A, a Ray node on host B, and an S3-compatible server on A (moto's),
    which stands in for run storage; the environment points every process of both hosts at it."""

    def __init__(self, hosts: TwoHosts, gcs_port: int = 6390, s3_port: int = 9010):
        self.hosts, self.gcs_port, self.s3_port = hosts, gcs_port, s3_port
        self.logs = hosts.base / "logs"
        self.logs.mkdir()
        s3 = f"http://{hosts.a.ip}:{self.s3_port}"
        common = {"PATH": f"{VENV_BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                  "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "AWS_ENDPOINT_URL": s3,
                  "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                  "AWS_EC2_METADATA_DISABLED": "true", "PYTHONPATH": str(ROOT)}
        self.env = {h.name: hosts.env(h, **common) for h in (hosts.a, hosts.b)}
        self.head = self.worker = None

    def _ray_start(self, host, *args: str):
        argv = [str(VENV_BIN / "ray"), "start", "--block", f"--node-ip-address={host.ip}", "--num-cpus=4",
                "--num-gpus=0", f"--temp-dir={self.hosts.root}/ray", "--object-store-memory=400000000",
                "--disable-usage-stats", f'--resources={{"host_{host.name}": 100}}', *args]
        return self.hosts.spawn(host, argv, env=self.env[host.name], log=self.logs / f"ray-{host.name}.log", cwd=ROOT)

    def start(self) -> None:
        h = self.hosts
        h.spawn(h.a, [str(VENV_BIN / "python"), "-c", "import sys, time; from moto.server import ThreadedMotoServer; "
                      f"s = ThreadedMotoServer(ip_address='{h.a.ip}', port={self.s3_port}); s.start(); "
                      "print('s3 ready', flush=True); time.sleep(1e9)"],
                env=self.env["a"], log=self.logs / "s3.log", cwd=ROOT)
        self.head = self._ray_start(h.a, "--head", f"--port={self.gcs_port}", "--include-dashboard=false")
        self.wait_nodes(1)
        self.start_worker()
        made = self.on_a([str(VENV_BIN / "python"), "-c", "import boto3; boto3.client('s3').create_bucket(Bucket='docrl')"])
        assert made.returncode == 0, made.stderr

    def start_worker(self) -> None:
        self.worker = self._ray_start(self.hosts.b, f"--address={self.hosts.a.ip}:{self.gcs_port}")
        self.wait_nodes(2)

    def kill_worker(self) -> None:
        """Host B's Ray node dies: its whole process group, at once."""
        import signal

        TwoHosts.stop(self.worker, signal.SIGKILL)

    def nodes(self) -> list[dict]:
        script = (f"import json, ray; ray.init(address='{self.hosts.a.ip}:{self.gcs_port}', logging_level='ERROR'); "
                  "print(json.dumps([{'ip': n['NodeManagerAddress'], 'alive': n['Alive'], 'id': n['NodeID']} "
                  "for n in ray.nodes()]))")
        done = self.on_a([str(VENV_BIN / "python"), "-c", script], timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def wait_nodes(self, alive: int, timeout_s: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                nodes = self.nodes()
                if sum(n["alive"] for n in nodes) >= alive:
                    return nodes
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
            assert time.monotonic() < deadline, f"{alive} Ray nodes not alive within {timeout_s} s: {self._tail()}"
            time.sleep(2)

    def _tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.logs.iterdir()))

    def on_a(self, argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        return self.hosts.run(self.hosts.a, argv, env=self.env["a"], timeout=timeout, cwd=ROOT)

    def docrl(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.on_a([str(VENV_BIN / "docrl"), *args], timeout=timeout)

    def docrl_background(self, log: str, *args: str) -> subprocess.Popen:
        return self.hosts.spawn(self.hosts.a, [str(VENV_BIN / "docrl"), *args], env=self.env["a"],
                                log=self.logs / log, cwd=ROOT)
