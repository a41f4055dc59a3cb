"""How torch's CPU threads wait for work and how many there are: every command's default, in one
place. Each command imports this file before anything that imports torch, because the OpenMP runtime
of torch's CPU build (GNU libgomp) reads its environment once, when torch loads it.

Between two parallel regions an OpenMP thread waits: it spins (burns its core, and wakes at once),
then sleeps. On a machine of its own a spinning thread is the fastest; where other processes want
the same cores, it takes the time slices the working threads need, and a region waits for its
slowest thread. The candidates, measured side by side by `python bench_runs.py threads`
(BENCHMARKS.md, "Threads"):

    torch    torch's own: libgomp spins 300,000 times (13 ms on the 2-core VM), then sleeps
    passive  OMP_WAIT_POLICY=PASSIVE: sleeps at once
    spin     GOMP_SPINCOUNT=SPIN: spins 10,000 times (0.6 ms there), then sleeps
    active   OMP_WAIT_POLICY=ACTIVE: spins until the next region
    free     as many threads as the cores that are idle when the command starts (`free_cores`),
             waiting as `spin` does: threads on idle cores take nothing from other processes

CHOICE is the default. TESSERA_THREADS=<candidate> picks another for one command; OMP_WAIT_POLICY,
GOMP_SPINCOUNT and OMP_NUM_THREADS set by the user win over either, and so do `--threads N` /
run.threads (torch.set_num_threads once torch is loaded).
"""
import os

CHOICE = "free"            # the default candidate (BENCHMARKS.md, "Threads")
SPIN = "10000"             # GOMP_SPINCOUNT of the `spin` candidate (spins, not seconds)
CANDIDATES = {
    "torch": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin": {"GOMP_SPINCOUNT": SPIN},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "free": {"GOMP_SPINCOUNT": SPIN},              # and OMP_NUM_THREADS = free_cores()
}
OWN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")   # the variables candidates set


def _busy_ticks(cpus: set[int]) -> tuple[int, int]:
    """(busy, total) clock ticks since boot of the given CPUs, from /proc/stat."""
    busy = total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *ticks = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                values = [int(t) for t in ticks[:8]]
                total += sum(values)
                busy += sum(values) - values[3] - values[4]          # less idle and iowait
    return busy, total


def free_cores(sample_s: float = 0.05) -> int:
    """The cores this process may run on (its CPU affinity) that were idle over the last `sample_s`
    seconds, rounded, at least 1; where /proc/stat cannot be read, the cores less the load average
    of the last minute."""
    import time
    cpus = (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity")
            else set(range(os.cpu_count() or 1)))
    try:
        b0, t0 = _busy_ticks(cpus)
        time.sleep(sample_s)
        b1, t1 = _busy_ticks(cpus)
        idle = len(cpus) * (1 - (b1 - b0) / max(t1 - t0, 1))
    except (OSError, ValueError):
        idle = len(cpus) - os.getloadavg()[0]
    return max(1, min(len(cpus), round(idle)))


def apply(environ=os.environ) -> str:
    """Set the variables of the chosen candidate (TESSERA_THREADS, else CHOICE) that `environ` does
    not set already; returns the candidate's name. An unknown name ends the command with one
    line."""
    choice = environ.get("TESSERA_THREADS") or CHOICE
    if choice not in CANDIDATES:
        raise SystemExit(f"TESSERA_THREADS={choice}: expected one of {', '.join(CANDIDATES)}")
    for key, value in CANDIDATES[choice].items():
        environ.setdefault(key, value)
    if choice == "free" and "OMP_NUM_THREADS" not in environ:
        environ["OMP_NUM_THREADS"] = str(free_cores())
    return choice


USER = {key: os.environ[key] for key in OWN if key in os.environ}   # as given, before apply
CHOSEN = apply()
