"""What the benchmarks read from /proc (Linux): a process's CPU time and which server it belongs
to, and the machine's busy and stolen time. CPU times are in ticks of 1/CLK_TCK seconds."""

from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")

# RabbitMQ's Erlang VM and its helpers; PostgreSQL's processes are all named "postgres".
RABBITMQ_PROGRAMS = frozenset({"beam.smp", "erl_child_setup", "epmd", "inet_gethost"})


def process_ticks(pid: int) -> tuple[str, int] | None:
    """(command name, user + system ticks so far) of a process; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode()
    except OSError:
        return None
    # The name is in parentheses and may hold spaces or parentheses itself: split at the last one.
    comm = data[data.index("(") + 1 : data.rindex(")")]
    fields = data[data.rindex(")") + 2 :].split()
    return comm, int(fields[11]) + int(fields[12])  # utime + stime


def server_of(comm: str) -> str | None:
    """'postgres' or 'rabbitmq' for a process of those servers (by command name), else None."""
    if comm == "postgres":
        return "postgres"
    if comm in RABBITMQ_PROGRAMS:
        return "rabbitmq"
    return None


def machine_ticks() -> tuple[int, int]:
    """(busy, stolen) ticks of all CPUs so far. Busy leaves out idle, iowait and steal, the
    time the vCPUs ran nothing of this machine's; stolen is the time the hypervisor ran
    another guest while a vCPU of this one had work."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    steal = parts[7]
    return sum(parts) - parts[3] - parts[4] - steal, steal


def runqueue_wait_ms(pid: int) -> float:
    """Time the process's threads spent runnable but waiting for a core, so far (ms; the second
    field of /proc/<pid>/task/<tid>/schedstat, in ns)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e6


def pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
