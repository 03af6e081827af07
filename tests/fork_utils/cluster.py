"""Several "nodes" on one machine, each with its own network and its own disk, for multi-node tests.

`VirtualCluster(num_nodes)` gives each node
- a network namespace whose only link to the others is a virtual ethernet cable (`epnet0`, address 10.231.0.<i+1>)
  plugged into a bridge that lives in a namespace of its own (the "switch"): traffic between nodes crosses a real
  network interface, which can be taken down (`link_down`) or slowed down (`shape`: `tc netem`, or a `tbf` bandwidth
  cap where the kernel has no netem);
- a hostname of its own (`node<i>`, its own UTS namespace) that every node resolves (`/etc/netns/<ns>/hosts`, which
  `ip netns exec` puts in place of `/etc/hosts` on that node), as on a cluster;
- a private disk: `cluster.node_disk(i)` on this machine, seen by the node's processes at `cluster.disk_path`, the same
  path on every node (a bind mount in the node's own mount namespace), as a node-local scratch disk is.

`launch_on_nodes` starts one launcher per node (`torchrun` with a c10d rendezvous, `accelerate launch --num_machines`,
DeepSpeed's launcher with `--no_ssh`), each inside its node, with the hard timeout and clean-up of `launcher.launch`.

Needs root (namespaces, mounts); `VirtualCluster.unavailable()` says why not, for the tests to skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .launcher import (
    CONFIG_DIR,
    REPO_ROOT,
    TAG_ENV,
    LaunchResult,
    _collect_ranks,
    _signal_all,
    _tagged_pids,
    child_environment,
    free_port,
    wait_for_job,
)


SUBNET = "10.231.0"
INTERFACE = "epnet0"
NODE_ENV = "EPFORK_NODE"
_PREFIX = "epc"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()}")
    return done


def _remove_stale_clusters() -> None:
    """Namespaces and host files left by a test process that was killed (their owner's pid is gone)."""
    listed = _ip("netns", "list", check=False).stdout.split()
    for name in listed:
        if not name.startswith(_PREFIX) or "-" not in name:
            continue
        owner = name[len(_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            _ip("netns", "del", name, check=False)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


@dataclass
class Node:
    index: int
    namespace: str
    hostname: str
    address: str


class VirtualCluster:
    """`num_nodes` nodes joined by a switch; a context manager that removes everything it made."""

    def __init__(self, num_nodes: int = 2, workdir: str | Path | None = None):
        self.num_nodes = num_nodes
        self.id = f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ep-cluster-"))
        self.disk_path = self.workdir / "node-disk"
        self.switch = f"{self.id}-sw"
        self.nodes = [
            Node(i, f"{self.id}-n{i}", f"node{i}", f"{SUBNET}.{i + 1}") for i in range(num_nodes)
        ]

    @staticmethod
    def unavailable() -> str | None:
        """Why this machine cannot build a virtual cluster (None if it can)."""
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            return "network and mount namespaces need root"
        for tool in ("ip", "tc", "unshare", "mount"):
            if shutil.which(tool) is None:
                return f"`{tool}` is not installed"
        probe = f"{_PREFIX}{os.getpid()}-probe"
        done = _ip("netns", "add", probe, check=False)
        if done.returncode != 0:
            return f"`ip netns add` failed: {done.stderr.strip()}"
        _ip("netns", "del", probe, check=False)
        return None

    def node_disk(self, index: int) -> Path:
        """Node `index`'s private disk as this machine sees it (its processes see it at `disk_path`)."""
        return self.workdir / f"disk-of-node{index}"

    def __enter__(self) -> VirtualCluster:
        _remove_stale_clusters()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        self.disk_path.mkdir(parents=True, exist_ok=True)
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{node.address} {node.hostname}\n" for node in self.nodes)
        for node in self.nodes:
            self.node_disk(node.index).mkdir(parents=True, exist_ok=True)
            _ip("netns", "add", node.namespace)
            etc = Path("/etc/netns") / node.namespace
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)
            # Created in this namespace under names unique to this cluster, then moved: the switch's end into the
            # switch, the node's end into the node, where it is renamed to the same `epnet0` on every node.
            switch_end, node_end = f"{self.id[-9:]}s{node.index}", f"{self.id[-9:]}n{node.index}"
            _ip("link", "add", switch_end, "type", "veth", "peer", "name", node_end)
            _ip("link", "set", switch_end, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", switch_end, "master", "br0", "up")
            _ip("link", "set", node_end, "netns", node.namespace)
            _ip("-n", node.namespace, "link", "set", node_end, "name", INTERFACE)
            _ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", INTERFACE)
            _ip("-n", node.namespace, "link", "set", INTERFACE, "up")
            _ip("-n", node.namespace, "link", "set", "lo", "up")

    def close(self) -> None:
        for node in self.nodes:
            _ip("netns", "del", node.namespace, check=False)
            shutil.rmtree(Path("/etc/netns") / node.namespace, ignore_errors=True)
        _ip("netns", "del", self.switch, check=False)

    # Network faults and shaping, from outside the nodes.

    def link_down(self, index: int) -> None:
        """Unplug node `index`'s cable: its packets are dropped silently, as when a switch port or cable fails."""
        _ip("-n", self.nodes[index].namespace, "link", "set", INTERFACE, "down")

    def shape(self, index: int, delay_ms: float, rate_mbit: float) -> str:
        """Latency and a bandwidth cap on node `index`'s outgoing traffic, with `tc netem`; on kernels built without
        netem (`Specified qdisc kind is unknown`), the bandwidth cap alone with a token bucket (`tbf`). Returns what
        was applied."""
        namespace = self.nodes[index].namespace
        netem = ["netem", "delay", f"{delay_ms}ms", "rate", f"{rate_mbit}mbit"]
        # A bucket of a few milliseconds of traffic, and packets queued up to 100 ms before they are dropped.
        tbf = ["tbf", "rate", f"{rate_mbit}mbit", "burst", f"{max(32, int(rate_mbit * 1000 / 8 / 250))}kb",
               "latency", "100ms"]
        for qdisc in (netem, tbf):
            done = subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", INTERFACE, "root",
                                   *qdisc], capture_output=True, text=True, timeout=30)
            if done.returncode == 0:
                return " ".join(qdisc)
            if "unknown" not in done.stderr:
                break
        raise RuntimeError(f"`tc qdisc add ... {qdisc[0]}` failed: {done.stderr.strip()}")

    def traffic_bytes(self, index: int) -> int:
        """Bytes node `index` sent plus received over its cable so far."""
        stats = Path("/sys/class/net")
        command = f"cat {stats}/{INTERFACE}/statistics/tx_bytes {stats}/{INTERFACE}/statistics/rx_bytes"
        done = subprocess.run(["ip", "netns", "exec", self.nodes[index].namespace, "sh", "-c", command],
                              capture_output=True, text=True, timeout=30, check=True)
        return sum(int(value) for value in done.stdout.split())

    def node_command(self, index: int, command: list[str]) -> list[str]:
        """`command` run on node `index`: in its network namespace, with its hostname, its disk at `disk_path`."""
        node = self.nodes[index]
        inside = 'hostname "$0" && mount --bind "$1" "$2" && shift 2 && exec "$@"'
        return ["ip", "netns", "exec", node.namespace, "unshare", "--uts", "sh", "-c", inside, node.hostname,
                str(self.node_disk(index)), str(self.disk_path), *command]


def node_launcher_command(
    launcher: str,
    cluster: VirtualCluster,
    index: int,
    script: Path,
    args: list[str],
    nproc_per_node: int,
    port: int,
    run_id: str,
    accelerate_config: Path | None,
    hostfile: Path,
) -> list[str]:
    """The command a cluster user runs on node `index` to start its share of the job."""
    master = cluster.nodes[0].hostname
    nodes = cluster.num_nodes
    if launcher == "torchrun":
        # Elastic rendezvous: the agent on the endpoint's host serves the store, node ranks are assigned on joining.
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={nproc_per_node}",
               "--rdzv_backend=c10d", f"--rdzv_endpoint={master}:{port}", f"--rdzv_id={run_id}"]
    elif launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(accelerate_config or CONFIG_DIR / "accelerate_deepspeed_zero3.yaml"),
               "--num_machines", str(nodes), "--machine_rank", str(index), "--num_processes",
               str(nodes * nproc_per_node), "--main_process_ip", master, "--main_process_port", str(port),
               "--deepspeed_multinode_launcher", "standard"]
    elif launcher == "deepspeed":
        # DeepSpeed's launcher without ssh: started on every node with the shared hostfile and its node rank.
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}", "--no_ssh",
               f"--node_rank={index}", f"--master_addr={master}", f"--master_port={port}", "--no_local_rank"]
    else:
        raise ValueError(f"unknown multi-node launcher {launcher!r}: use 'torchrun', 'accelerate' or 'deepspeed'")
    return [*cmd, str(script), *map(str, args)]


@dataclass
class ClusterJob:
    """A job running on a cluster, handed to `during` callbacks (e.g. to inject a fault when the ranks are ready)."""

    cluster: VirtualCluster
    tag: str
    results: Path
    processes: list[subprocess.Popen]

    def node_pids(self, index: int) -> list[int]:
        """Every process of the job on node `index` (launcher, agent, ranks)."""
        needle = f"{NODE_ENV}={index}".encode()
        pids = []
        for pid in _tagged_pids(self.tag):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(pid)
            except OSError:
                continue
        return pids

    def kill_node(self, index: int) -> None:
        """Node `index` loses power: every process of the job on it is SIGKILLed at once."""
        _signal_all(self.node_pids(index), signal.SIGKILL)

    def wait_for_file(self, name: str, timeout: float) -> bool:
        """Wait until a rank creates `results/name` (a marker the rank script writes when it reaches a point)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.results / name).exists():
                return True
            if all(proc.poll() is not None for proc in self.processes):
                return False
            time.sleep(0.1)
        return False


@dataclass
class ClusterLaunchResult(LaunchResult):
    node_returncodes: list = None
    # time.monotonic() when the last node's launcher exited (or the timeout struck)
    finished_at: float = 0.0
    # What `during` returned (e.g. when the fault was injected, as time.monotonic())
    during_result: object = None


def launch_on_nodes(
    cluster: VirtualCluster,
    script: str | Path,
    args: list[str] | tuple = (),
    nproc_per_node: int = 2,
    launcher: str = "torchrun",
    timeout: float = 180,
    accelerate_config: str | Path | None = None,
    env: dict[str, str] | None = None,
    results_dir: str | Path | None = None,
    during: Callable[[ClusterJob], object] | None = None,
) -> ClusterLaunchResult:
    """Run `script` on every node of `cluster`, `nproc_per_node` ranks each; never blocks longer than `timeout` plus a
    few seconds of clean-up. `during(job)`, if given, runs while the job does (fault injection)."""
    results = Path(results_dir or tempfile.mkdtemp(prefix="epfork-cluster-"))
    results.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    # gloo (CPU): multi-GPU nodes are not simulated
    base_env = child_environment(tag, results, "gloo", env)
    # Collectives go over the node's cable, as NCCL/gloo are pointed at the cluster network on real clusters.
    base_env["GLOO_SOCKET_IFNAME"] = INTERFACE
    hostfile = results / "hostfile"
    hostfile.write_text("".join(f"{node.hostname} slots={nproc_per_node}\n" for node in cluster.nodes))
    port, run_id = free_port(), tag[:12]
    config = Path(accelerate_config) if accelerate_config else None
    commands = [
        cluster.node_command(
            node.index,
            node_launcher_command(launcher, cluster, node.index, Path(script), list(args), nproc_per_node, port,
                                  run_id, config, hostfile),
        )
        for node in cluster.nodes
    ]
    outputs = [open(results / f"node{node.index}.log", "wb") for node in cluster.nodes]  # noqa: SIM115
    start = time.monotonic()
    processes = [
        subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env={**base_env, NODE_ENV: str(index)}, cwd=str(REPO_ROOT), start_new_session=True)
        for index, (command, output) in enumerate(zip(commands, outputs))
    ]
    job = ClusterJob(cluster, tag, results, processes)
    try:
        end = wait_for_job(tag, processes, start + timeout, during=(lambda: during(job)) if during else None)
    finally:
        for output in outputs:
            output.close()
    elapsed = time.monotonic() - start
    codes = [proc.returncode for proc in processes]
    output = "\n".join(
        f"===== node {node.index} =====\n" + (results / f"node{node.index}.log").read_text(errors="replace")
        for node in cluster.nodes
    )
    outcome = ClusterLaunchResult(
        command=commands[0],
        tag=tag,
        returncode=None if end.timed_out else next((code for code in codes if code != 0), 0),
        timed_out=end.timed_out,
        elapsed=elapsed,
        timeout=timeout,
        output=output,
        ended_at=end.ended_at,
        leftover_pids=end.leftover,
        stragglers=end.stragglers,
        node_returncodes=codes,
        finished_at=end.finished_at,
        during_result=end.during_result,
    )
    outcome.ranks = _collect_ranks(results)
    return outcome


__all__ = ["VirtualCluster", "launch_on_nodes", "ClusterJob", "ClusterLaunchResult", "NODE_ENV", "TAG_ENV"]
