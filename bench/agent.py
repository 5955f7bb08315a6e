"""The guest agent client's costs, against a real qemu-ga on the host.

    python -m bench.agent [--rounds 50] [--mib 10]

qemu-ga (Debian's qemu-guest-agent) runs on the host as an unprivileged uid
on a socket root bound (tests/integration/host_agent.py), so this measures
the client and qemu-ga themselves, without a virtio-serial port or a guest
CPU (a TCG guest adds both):

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
from tests.integration.host_agent import HostAgent, host_agent


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


def _copies(client: AgentClient, agent: HostAgent, mib: int, chunk: int) -> list[str]:
    data = os.urandom(mib << 20)
    path = str(agent.home / "bench.bin")
    to, back, cpu = [], [], []
    for _ in range(3):
        own, ga = time.process_time(), _cpu_of(agent.process.pid)
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
                    (_cpu_of(agent.process.pid) - ga) / (2 * mib)))
    own_ms = statistics.median(c[0] for c in cpu) * 1000
    ga_ms = statistics.median(c[1] for c in cpu) * 1000
    return [f"| copy {mib} MiB, chunk {chunk >> 10} KiB | to guest "
            f"{statistics.median(to):.1f} MB/s | from guest {statistics.median(back):.1f} MB/s "
            f"| CPU per MiB: client {own_ms:.0f} ms, qemu-ga {ga_ms:.0f} ms |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--mib", type=int, default=10)
    args = parser.parse_args()
    rows = ["| what | median | p90 | |", "|---|---|---|---|"]
    with host_agent() as agent:
        sock = agent.connect()
        client = AgentClient(sock)
        client.ping()
        for name, op in (("exec true", lambda: client.exec(["true"])),
                         ("ping", client.ping)):
            samples = sorted(_times(op, args.rounds))
            p90 = samples[int(len(samples) * 0.9) - 1]
            rows.append(f"| {name} ({args.rounds} rounds) | "
                        f"{statistics.median(samples) * 1000:.2f} ms | {p90 * 1000:.2f} ms | |")
        for chunk in (64 << 10, 256 << 10, 1 << 20, 4 << 20):
            rows += _copies(client, agent, args.mib, chunk)
        sock.close()
    print("\n".join(rows))
    print(f"\nload average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
