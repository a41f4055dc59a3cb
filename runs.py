"""Where a run folder may be, what it holds and who may write it, so that a run is never mixed with
another config, other data or another process's fold (docs/running.md, "Folds on many machines").
check_run_dir, before anything is read: a plain folder directly inside run.dir, apart from
data.root, writable (a probe file, removed at once). Then:

    runs/<name>/lock             held while a process creates or checks config.yaml and folds.json
    runs/<name>/folds.json       the fold assignment (train, val and test slide ids per fold) and
                                 each slide file's size and sha1, written once by the run's first
                                 process
    runs/<name>/fold_<k>/lock    held while a process trains fold k: its pid, host and start time

and how long the rest of the run will take (`Progress`, the estimate on train.py's progress lines).

A lock is a file created with O_CREAT | O_EXCL: exactly one process can create it, also on most
shared file systems. A lock left by a process that is no longer running (same host, pid gone) is
taken over with a one-line note; a lock of another host cannot be checked and is refused, naming the
file to delete.

A slide's fingerprint is its size and the sha1 of the whole file: a cache rewritten with other
counts of the same shape keeps its size and often its first megabytes (HDF5 puts the header and the
features first), so only the full content tells. Hashing reads each file once, at most what one
fold's training reads anyway (about 20 ms for a 10 MB cache).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

import checks
import data
from conformal import held_out
from files import listed

RECORD = "folds.json"
# run.<key>: where a run computes, not what; may differ between processes
WHERE_KEYS = ("device", "threads")
WAIT_S = 120                          # how long a process waits for another to check the run folder


def fold_numbers(given: list[str], n_folds: int) -> list[int]:
    """--fold values ("0", "0,2", repeated) as sorted fold numbers of a run of n_folds folds."""
    out = set()
    for item in given:
        for part in item.split(","):
            if not part.strip().isdigit():
                raise checks.ConfigError(f"--fold {item}: expected fold numbers like 0, 2 or 0,2, "
                                         f"found {part!r}")
            if int(part) >= n_folds:
                raise checks.ConfigError(f"--fold {item}: expected one of the run's folds "
                                         f"{', '.join(map(str, range(n_folds)))}, "
                                         f"found {int(part)}")
            out.add(int(part))
    return sorted(out)


# ---- the fold record -----------------------------------------------------------------------------
def fingerprint(path: Path) -> dict:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha1": h.hexdigest()}


def fold_record(cfg: dict, folds: list[tuple[list[str], list[str]]], root: Path) -> dict:
    """The folds as train.run_fold uses them (conformal.held_out: the slides it trains on, validates
    and calibrates with) and the fingerprint of every slide and of the gene list and GMT files the
    config names."""
    ids = sorted({s for train, test in folds for s in train + test})
    slides = {s: SimpleNamespace(id=s, patient=data.read_slide_meta(root / f"{s}.h5").patient)
              for s in ids}
    files = {key: checks.data_file(cfg, key, root) for key in ("genes", "gmt")
             if isinstance(cfg["data"][key], str)}
    split = [[[m.id for m in part] for part in held_out([slides[s] for s in train], cfg)]
             for train, _ in folds]
    return {"folds": [{"train": t, "val": v, "calibration": c, "test": test}
                      for (t, v, c), (_, test) in zip(split, folds)],
            "slides": {s: fingerprint(root / f"{s}.h5") for s in ids},
            "files": {f"data.{key}": {"path": str(p), **fingerprint(p)}
                      for key, p in files.items()}}


def record_changes(saved: dict, now: dict) -> list[str]:
    """What differs between the record a run started with and the present one, in words."""
    out = []
    a, b = saved.get("slides", {}), now["slides"]
    if set(b) - set(a):
        out.append(f"slides added: {listed(sorted(set(b) - set(a)), 8)}")
    if set(a) - set(b):
        out.append(f"slides removed: {listed(sorted(set(a) - set(b)), 8)}")
    changed = [s for s in sorted(set(a) & set(b)) if a[s] != b[s]]
    if changed:
        out.append("content changed: "
                   + listed((f"{s}.h5 ({a[s]['bytes']} -> {b[s]['bytes']} bytes, sha1 "
                             f"{a[s]['sha1'][:8]} -> {b[s]['sha1'][:8]})" for s in changed), 8))
    fa, fb = saved.get("folds", []), now["folds"]
    if len(fa) != len(fb):
        out.append(f"{len(fb)} folds instead of {len(fa)}")
    for k, (x, y) in enumerate(zip(fa, fb)):
        for part in ("train", "val", "calibration", "test"):
            if x.get(part, []) != y[part]:
                gone, new = (sorted(set(x.get(part, [])) - set(y[part])),
                             sorted(set(y[part]) - set(x.get(part, []))))
                what = (f"without {listed(gone, 8) or '-'}, with {listed(new, 8) or '-'}"
                        if gone or new else "the same slides in another order")
                out.append(f"fold {k} {part} slides differ ({what})")
    for key in sorted(set(saved.get("files", {})) | set(now["files"])):
        x, y = saved.get("files", {}).get(key), now["files"].get(key)
        if x != y:
            out.append(f"{key} file {(y or x)['path']} changed")
    return out


# ---- locks ---------------------------------------------------------------------------------------
def _holder(path: Path) -> dict | None:
    """The lock's owner; {} while it is being written (or broken), None when there is no lock."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _running(owner: dict) -> bool | None:
    """Whether the lock's process runs: True / False on this host, None where that cannot be
    told."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                  # another user's process
        return True
    return True


def describe(owner: dict) -> str:
    return (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since "
            f"{owner.get('started', '?')}")


def held(path: Path, owner: dict, what: str) -> str:
    """The line that refuses a lock held by another process."""
    if not owner:
        return (f"{path}: {what} another process (its lock is being written, or broken: delete it "
                "if no process holds it)")
    line = f"{path}: {what} {describe(owner)}"
    if _running(owner) is None:
        line += ("; a process of another host cannot be checked from here: if it is gone, "
                 f"delete {path}")
    return line


def _take_over(path: Path, owner: dict) -> bool:
    """Remove a dead process's lock, unless another process got there first: `<lock>.takeover`
    (O_EXCL) lets one process at a time look and remove, so a fresh lock is never removed for a
    stale one."""
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > 10:  # left by a process killed in these lines
                guard.unlink()
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return False
    try:
        if _holder(path) == owner:
            path.unlink()
            return True
        return False
    finally:
        os.close(fd)
        guard.unlink()


def take(path: Path) -> tuple[dict | None, str | None]:
    """Create the lock for this process: (None, a note if a dead process's lock was taken over), or
    (the owner, None) when another process holds it."""
    note = None
    for _ in range(200):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _holder(path)
            if owner is None:                                # released meanwhile
                continue
            if not owner:                                    # being written: look again shortly
                try:
                    young = time.time() - path.stat().st_mtime < 5
                except FileNotFoundError:
                    continue
                if young:
                    time.sleep(0.05)
                    continue
                return owner, None
            if _running(owner) is not False:
                return owner, None
            if _take_over(path, owner):
                note = (f"{path}: took over the lock of {describe(owner)}, which is no "
                        "longer running")
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        return None, note
    return _holder(path) or {}, None


def release(path: Path) -> None:
    """Remove the lock if this process holds it."""
    owner = _holder(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def release_folds(run_dir: Path, ks) -> None:
    for k in ks:
        release(run_dir / f"fold_{k}" / "lock")


# ---- the run folder ------------------------------------------------------------------------------
def differences(saved, given, prefix="") -> list[str]:
    """The dotted keys whose values differ between two configs, with both values."""
    out = []
    for key in list(saved) + [k for k in given if k not in saved]:
        a, b = saved.get(key, "absent"), given.get(key, "absent")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} (run {a!r}, given {b!r})")
    return out


def check_writable(run_dir: Path) -> None:
    """The run folder, or the nearest folder above it that exists, takes a new file
    (data.check_writable)."""
    try:
        data.check_writable(run_dir, "key 'run.dir'")
    except ValueError as e:
        raise checks.ConfigError(str(e)) from None


def check_run_dir(cfg: dict) -> Path:
    """The run folder run.dir/run.name, before anything is read or written: a plain folder name, so
    the folder lies directly inside run.dir (also once links are followed), and apart from data.root
    (not it, not inside it, not around it). Returns it as given; open_run guards what is inside."""
    name, base = cfg["run"]["name"], Path(cfg["run"]["dir"])
    seps = {"/", "\\", os.sep, os.altsep} - {None}
    if name in (".", "..") or name.startswith(".") or any(s in name for s in seps) or "\0" in name:
        raise checks.ConfigError("key 'run.name': expected a folder name inside run.dir (no "
                                 f"path separator, not '.', '..' or hidden), found {name!r}")
    run_dir = base / name
    if run_dir.exists() and not run_dir.is_dir():
        raise checks.ConfigError(f"{run_dir}: key 'run.name': expected a run folder, found a file")
    inside = base.resolve()
    where = run_dir.resolve()
    if where.parent != inside:
        raise checks.ConfigError(f"{run_dir}: key 'run.name': expected a folder inside run.dir "
                                 f"{inside}, found a link to {where}, outside run.dir")
    data_root = Path(cfg["data"]["root"]).resolve()
    if where == data_root or data_root in where.parents or where in data_root.parents:
        relation = ("is" if where == data_root else "is inside" if data_root in where.parents
                    else "holds")
        raise checks.ConfigError(f"{run_dir}: key 'run.name' / 'run.dir': expected a run folder "
                                 f"apart from the data, found one that {relation} "
                                 f"data.root {data_root}")
    check_writable(run_dir)
    return run_dir


def _what(cfg: dict) -> dict:
    out = copy.deepcopy(cfg)
    for key in WHERE_KEYS:
        out.get("run", {}).pop(key, None)
    return out


def open_run(run_dir: Path, cfg: dict, record: dict, resume: bool, joining: bool) -> list[str]:
    """Under the run lock: a new run writes folds.json and config.yaml; an existing run is continued
    only with --resume, or joined by a fold job (--fold), and then only with the same config
    (run.device and run.threads aside) and the same folds and data. Returns notes for the log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock, notes, t0 = run_dir / "lock", [], time.time()
    while True:
        owner, note = take(lock)
        notes += [note] if note else []
        if owner is None:
            break
        if time.time() - t0 > WAIT_S:
            raise checks.ConfigError(held(lock, owner,
                                          f"waited {WAIT_S} s for the run folder, held by"))
        time.sleep(0.2)
    try:
        notes += _open_locked(run_dir, cfg, record, resume, joining)
    finally:
        release(lock)
    return notes


def _open_locked(run_dir: Path, cfg: dict, record: dict, resume: bool, joining: bool) -> list[str]:
    config, record_path = run_dir / "config.yaml", run_dir / RECORD
    if not config.exists():
        other = sorted(p.name for p in run_dir.iterdir()
                       if not p.name.startswith(("lock", ".")) and p.name != RECORD)
        if other:
            raise checks.ConfigError(f"{run_dir}: expected a new run folder, found "
                                     f"{listed(other, 8)} and no config.yaml (not a run of "
                                     "train.py): choose another run.name")
        with data.atomic_path(record_path) as tmp:  # the record first: config.yaml marks a run
            tmp.write_text(json.dumps(record, indent=1) + "\n")
        with data.atomic_path(config) as tmp:
            tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return []
    try:
        saved = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise checks.ConfigError(
            f"{config}: expected the config the run started with, found: {e}") from None
    diff = differences(_what(saved if isinstance(saved, dict) else {}), _what(cfg))
    flag = "--resume" if resume else "--fold"
    if diff and (resume or joining):
        raise checks.ConfigError(f"{config}: {flag} expected the config the run started with, "
                                 f"found other values for {'; '.join(diff)}")
    if diff:
        raise checks.ConfigError(f"{run_dir} holds a run of another config ({'; '.join(diff)}): "
                                 "choose another run.name")
    if not (resume or joining):
        raise checks.ConfigError(f"{run_dir} holds this run already: pass --resume to continue "
                                 "it, or choose another run.name")
    if not record_path.exists():  # a run begun before runs kept this record
        with data.atomic_path(record_path) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
        return [f"{record_path} was missing: recorded the present folds and data"]
    try:
        changes = record_changes(json.loads(record_path.read_text()), record)
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        raise checks.ConfigError(
            f"{record_path}: expected the run's fold record, found: {e}") from None
    if changes:
        raise checks.ConfigError(f"{record_path}: {flag} expected the folds and data the run "
                                 f"started with, found {'; '.join(changes)}")
    return []


def claim_folds(run_dir: Path, ks: list[int], resume: bool) -> tuple[list[int], list[str]]:
    """The fold locks of the folds to train (those without `done`), all or none; a fold that an
    earlier process started (a checkpoint, a model, predictions) is continued only with --resume.
    Returns (the folds now locked for this process, notes)."""
    todo, notes = [], []
    try:
        for k in ks:
            fold_dir = run_dir / f"fold_{k}"
            if (fold_dir / "done").exists():
                notes.append(f"fold {k}: finished earlier, skipped")
                continue
            fold_dir.mkdir(exist_ok=True)
            owner, note = take(fold_dir / "lock")
            if owner is not None:
                raise checks.ConfigError(held(fold_dir / "lock", owner,
                                              f"fold {k} is being trained by"))
            todo.append(k)
            notes += [note] if note else []
            if (fold_dir / "done").exists():                # finished by its owner while we looked
                notes.append(f"fold {k}: finished earlier, skipped")
                release(fold_dir / "lock")
                todo.pop()
                continue
            begun = sorted(p.name for p in fold_dir.iterdir() if not p.name.startswith("lock"))
            if begun and not resume:
                raise checks.ConfigError(f"{fold_dir}: fold {k} was begun earlier "
                                         f"({', '.join(begun)}): pass --resume to continue it")
    except BaseException:
        release_folds(run_dir, todo)
        raise
    return todo, notes


def fold_sizes(record: dict, root: Path) -> list[dict]:
    """What each fold of the record (`fold_record`) will do, for `Progress`: the spots of each of
    its training slides (a step each per epoch), of its validation slides (scored every epoch), of
    its test slides (predicted once) and of every slide it reads."""
    spots = {s: data.read_slide_meta(root / f"{s}.h5").n_spots for s in record["slides"]}
    return [{"train": [spots[s] for s in f["train"]], "val": [spots[s] for s in f["val"]],
             "test": [spots[s] for s in f["test"]],
             "read": sum(spots[s] for part in ("train", "val", "calibration", "test")
                         for s in f.get(part, []))} for f in record["folds"]]


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(a, b) of y = a + b x, least squares over the points, both at least 0 (a < 0: the line
    through 0; b < 0: the mean); None while the x lie within 5% of their mean (no slope to tell)."""
    x, y = [float(p) for p, _ in points], [float(q) for _, q in points]
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    var = sum((v - mean_x) ** 2 for v in x)
    if var <= (0.05 * mean_x) ** 2 * len(x):
        return None
    b = sum((u - mean_x) * (v - mean_y) for u, v in zip(x, y)) / var
    a = mean_y - b * mean_x
    if a < 0 or b < 0:
        return (0.0, sum(y) / sum(x)) if a < 0 else (mean_y, 0.0)
    return a, b


def step_fit(steps: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of seconds per training step = a + b x spots (`line_fit` over the measured (spots,
    seconds)); b alone, seconds per spot, while the measured slides have one size."""
    return line_fit(steps) or (0.0, sum(t for _, t in steps) / max(sum(n for n, _ in steps), 1))


class Progress:
    """The time left of a run, for train.py's progress lines. What each fold still to run will do is
    known before it starts (`fold_sizes`): one training step per training slide and epoch, its
    validation slides scored every epoch, its test slides predicted once, its slides read first.
    What was measured so far: every training step with its slide's spots, every epoch, and each
    fold's time before its epochs (reading, genes, the closed-form fits) and after them (predicting
    the test slides, writing files). The estimate of a fold:
      epochs  the current fold's mean epoch, once it has one; for a fold not begun, its steps at
              a + b x spots (`step_fit`), its validation slides at a third of a step (a forward
              pass), times the ratio of the measured epochs to that same sum for their folds;
      before  seconds per spot read, measured on the folds begun (the current fold: at least its
              time so far);
      after   a fixed part (writing files) plus a part per test slide, a third of a step each
              (as validation slides; without training steps: its spots), fitted (`line_fit`) on
              the folds done; while they cannot tell the two parts apart (one fold done), the
              geometric mean of all fixed and all per slide; before a fold is done, the test
              slides as validation slides, times the epochs' ratio.
    `clock` is injectable so that tests can script time."""

    def __init__(self, folds: list[dict], epochs: int, clock=time.monotonic):
        self.folds = [dict(f, left=epochs) for f in folds]      # the folds still to run, in order
        self.clock, self.steps = clock, []
        self.epoch_log = []               # (seconds, its fold) of every epoch measured
        self.before = []                  # (spots read, seconds before the epochs) per fold
        self.after = []                   # (the fold, seconds after its epochs) per fold done
        self.fold_t0 = self.before_s = None
        self.fold_epochs = []             # the current fold's epoch seconds

    def start_fold(self) -> None:
        self.fold_t0, self.before_s, self.fold_epochs = self.clock(), None, []

    def begin_epochs(self, n: int) -> None:
        """The current fold is set up and runs `n` epochs now (resumed: fewer; no network: 0)."""
        self.folds[0]["left"] = n
        self.before_s = self.clock() - self.fold_t0
        self.before.append((self.folds[0]["read"], self.before_s))

    def step(self, spots: int, seconds: float) -> None:
        self.steps.append((spots, seconds))

    def epoch(self, seconds: float) -> str:
        """Record one finished epoch of the current fold; the estimate of the time left (1m05s)."""
        self.fold_epochs.append(seconds)
        self.epoch_log.append((seconds, self.folds[0]))
        self.folds[0]["left"] = max(self.folds[0]["left"] - 1, 0)
        left = self.seconds_left()
        return f"{int(left // 60)}m{int(left % 60):02d}s"

    def end_fold(self) -> tuple[float, float, int]:
        """(the fold's seconds, of them in epochs, its epochs), and the fold is done."""
        total = self.clock() - self.fold_t0
        in_epochs = sum(self.fold_epochs)
        before = self.before_s if self.before_s is not None else total - in_epochs
        self.after.append((self.folds[0], total - before - in_epochs))
        self.folds.pop(0)
        self.fold_t0 = None
        return total, in_epochs, len(self.fold_epochs)

    def _forward(self, spots: list[int]) -> float:
        """Forward passes over slides of these spots, a third of a step each by the step fit."""
        if not self.steps:
            return 0.0
        a, b = step_fit(self.steps)
        return sum(a + b * n for n in spots) / 3

    def _modelled(self, fold: dict) -> float:
        """An epoch of `fold` by the step fit, before the measured ratio."""
        return 3 * self._forward(fold["train"]) + self._forward(fold["val"])

    def _after(self, fold: dict, ratio: float) -> float:
        """The fold's time after its epochs (`Progress`, "after")."""
        if not self.after:
            return ratio * self._forward(fold["test"])
        work = lambda f: self._forward(f["test"]) if self.steps else float(sum(f["test"]))  # noqa
        points = [(work(f), s) for f, s in self.after]
        fit = line_fit(points)
        if fit is not None:
            return fit[0] + fit[1] * work(fold)
        fixed = sum(s for _, s in points) / len(points)
        per_slide = sum(s for _, s in points) / max(sum(w for w, _ in points), 1e-12) * work(fold)
        return (fixed * per_slide) ** 0.5

    def seconds_left(self) -> float:
        modelled = sum(self._modelled(f) for _, f in self.epoch_log)
        ratio = sum(s for s, _ in self.epoch_log) / modelled if modelled > 0 else 1.0
        before_rate = (sum(s for _, s in self.before) / max(sum(n for n, _ in self.before), 1)
                       if self.before else None)
        left = 0.0
        for i, fold in enumerate(self.folds):
            current = i == 0 and self.fold_t0 is not None
            if current and self.fold_epochs:
                epoch = sum(self.fold_epochs) / len(self.fold_epochs)
            else:
                epoch = ratio * self._modelled(fold)
            left += fold["left"] * epoch
            after = self._after(fold, ratio)
            if current and self.before_s is None:     # still setting up: at least what it took
                spent = self.clock() - self.fold_t0
                before = before_rate * fold["read"] if before_rate is not None else spent
                left += max(before - spent, 0.0) + after
            elif current:
                spent = self.clock() - self.fold_t0 - self.before_s - sum(self.fold_epochs)
                left += max(after - max(spent, 0.0), 0.0) if fold["left"] == 0 else after
            else:
                left += (before_rate or 0.0) * fold["read"] + after
        return left
