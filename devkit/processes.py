"""What runs below a node, and what a process costs, read from ``/proc``: in a
millisecond, so a caller can watch containers as fast as they change, where a status
broadcast takes half a second or more."""

from __future__ import annotations

import os

import psutil


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below ``pid`` (none once it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def children(pid: int) -> list[psutil.Process]:
    """The processes ``pid`` started itself (none once it is gone)."""
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def containers_of(node_pid: int) -> list[psutil.Process]:
    """A node's forked containers, draining ones too: the children of its fork server."""
    for child in children(node_pid):
        try:
            if "forkserver" in " ".join(child.cmdline()):
                return child.children()
        except psutil.NoSuchProcess:
            continue
    return []


def thread_count(pid: int) -> int:
    return _status_field(pid, "Threads:")


def rss_bytes(pid: int) -> int:
    return _status_field(pid, "VmRSS:") * 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_field(pid: int, name: str) -> int:
    """A number from ``/proc/<pid>/status`` (``Threads:``, ``VmRSS:`` in kB)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(name):
                return int(line.split()[1])
    raise RuntimeError(f"no {name} of {pid}")
