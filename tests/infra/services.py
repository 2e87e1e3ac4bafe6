"""Helpers of the infra tests: free ports, our own processes, and the kernel's socket table."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "infra" / "local"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_naming(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (our private temp dir): ours alone."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def process_tree(root: int) -> set[int]:
    """``root`` and every process descended from it (parents read from /proc)."""
    parents = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def listening_sockets(pids: set[int]) -> list[tuple[str, str, int]]:
    """(protocol, local address, pid) of every TCP listener and bound UDP socket of ``pids``,
    read from the kernel's socket table (``ss``)."""
    table = subprocess.run(["ss", "-H", "-l", "-t", "-u", "-n", "-p"], capture_output=True,
                           text=True, check=True).stdout
    found = []
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 6 or "pid=" not in line:
            continue
        owners = {int(part.split("=", 1)[1]) for part in line.replace(")", ",").split(",")
                  if part.startswith("pid=")}
        for pid in owners & pids:
            found.append((fields[0], fields[4], pid))
    return found


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host.startswith(("127.", "::ffff:127.")) or host in ("::1", "localhost")
