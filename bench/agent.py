"""The guest agent client's costs, against a real qemu-ga on the host.

    python -m bench.agent [--rounds 50] [--mib 10] [--guest]

qemu-ga (Debian's qemu-guest-agent) runs on the host as an unprivileged uid
on a socket root bound (tests/integration/host_agent.py), so this measures
the client and qemu-ga themselves, without a virtio-serial port or a guest
CPU; with ``--guest`` the same again through QEMU's virtio-serial port to
qemu-ga in a TCG guest (tests/integration/agent_guest.py; the CPU column is
then QEMU's, the whole guest's):

- one ``exec(["true"])`` whole (sync, guest-exec, guest-exec-status polls),
  and one ``ping`` (sync + guest-ping), median and p90 of ``--rounds``;
- a ``--mib`` MiB file copied into the "guest" and back through
  guest-file-write / guest-file-read, for a few chunk sizes (MB/s, median
  of 3), with the client's and qemu-ga's CPU time per MiB.

Prints a markdown table.  A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable

from svirt.agent import AgentClient
from tests.integration.agent_guest import agent_guest
from tests.integration.host_agent import host_agent


def _times(op: Callable[[], object], rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        op()
        samples.append(time.perf_counter() - start)
    return samples


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _copies(client: AgentClient, where: str, path: str, pid: int, mib: int,
            chunk: int) -> list[str]:
    data = os.urandom(mib << 20)
    to, back, cpu = [], [], []
    for _ in range(3):
        own, ga = time.process_time(), _cpu_of(pid)
        start = time.perf_counter()
        client.copy_to_guest(io.BytesIO(data), path, chunk=chunk)
        middle = time.perf_counter()
        out = io.BytesIO()
        client.copy_from_guest(path, out, chunk=chunk)
        end = time.perf_counter()
        assert out.getvalue() == data  # noqa: S101 - a copy that is wrong measures nothing
        to.append(len(data) / (middle - start) / 1e6)
        back.append(len(data) / (end - middle) / 1e6)
        cpu.append(((time.process_time() - own) / (2 * mib),
                    (_cpu_of(pid) - ga) / (2 * mib)))
    own_ms = statistics.median(c[0] for c in cpu) * 1000
    ga_ms = statistics.median(c[1] for c in cpu) * 1000
    return [f"| {where} copy {mib} MiB, chunk {chunk >> 10} KiB | to guest "
            f"{statistics.median(to):.1f} MB/s | from guest {statistics.median(back):.1f} MB/s "
            f"| CPU per MiB: client {own_ms:.0f} ms, agent side {ga_ms:.0f} ms |"]


def _measure(client: AgentClient, where: str, path: str, pid: int,
             args: argparse.Namespace) -> list[str]:
    rows = []
    for name, op in (("exec true", lambda: client.exec(["true"])), ("ping", client.ping)):
        samples = sorted(_times(op, args.rounds))
        p90 = samples[int(len(samples) * 0.9) - 1]
        rows.append(f"| {where} {name} ({args.rounds} rounds) | "
                    f"{statistics.median(samples) * 1000:.2f} ms | {p90 * 1000:.2f} ms | |")
    for chunk in (64 << 10, 256 << 10, 1 << 20, 4 << 20):
        rows += _copies(client, where, path, pid, args.mib, chunk)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--mib", type=int, default=10)
    parser.add_argument("--guest", action="store_true", help="also through a TCG guest")
    args = parser.parse_args()
    rows = ["| what | median | p90 | |", "|---|---|---|---|"]
    with host_agent() as agent:
        sock = agent.connect()
        client = AgentClient(sock)
        client.ping()
        rows += _measure(client, "host qemu-ga:", str(agent.home / "bench.bin"),
                         agent.process.pid, args)
        sock.close()
    if args.guest:
        with agent_guest() as guest:
            rows.append(f"| TCG guest: boot to the agent's first answer | "
                        f"{guest.boot_seconds:.1f} s | | |")
            rows += _measure(guest.client, "TCG guest:", "/tmp/bench.bin",
                             guest.process.pid, args)
    print("\n".join(rows))
    print(f"\nload average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
