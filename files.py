"""The files themselves: how every file is written (one writing helper for every command: names
from data checked, never through a link, never over an input or an existing file without
--overwrite, all or nothing, a full disk named in one line), how every text is read (one decoding:
UTF-8, a byte-order mark and Windows line endings dropped, names stripped of surrounding spaces,
case-only clashes refused), how a bad file is named (file, key, expected, found; numeric values
checked block by block), whether the machine has the memory and disk a command is about to use; and
every file format the project reads or writes besides the slide caches (data.py): the small text
files a run reads (gene lists, MSigDB gene sets, metadata.csv, HEST-Benchmark split CSVs), the
prediction files it writes, and AnnData .h5ad (read and written with h5py only). The lowest file of
the data-contract layer: data.py and every program read and write files the same way through it.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import errno
import io
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch


# ----------------------------------------------------------------------------- a bad file, named
class CacheError(ValueError):
    """A file that does not have the layout it should; the message names file, key, expected,
    found."""


def fail(path, key, expected, found):
    raise CacheError(f"{path}: key '{key}': expected {expected}, found {found}")


def listed(items, n: int = 5) -> str:
    """The first n items, comma-separated, and " ..." when some were cut: messages that show part of
    a list."""
    items = [str(x) for x in items]
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")


def open_h5(path, what: str = "slide cache") -> h5py.File:
    """An HDF5 file opened for reading; an error naming it when it is not one (`what` says what was
    expected)."""
    try:
        return h5py.File(path, "r")
    except (OSError, FileNotFoundError) as e:
        raise CacheError(f"{path}: expected a readable HDF5 {what}, found: {e}") from None


def h5_node(path, f, key: str, expected: str = "a dataset or group"):
    """f[key], a dataset or a group; a key that is absent, or a link (soft or to another file) that
    leads nowhere, is an error naming the file and the key."""
    if key not in f:
        fail(path, key, expected, "no such key")
    try:
        return f[key]
    except (KeyError, OSError):
        link = type(f.get(key, getlink=True)).__name__
        fail(path, key, expected, f"a link that leads nowhere ({link})")


def dataset(path, f, key: str, expected: str = "a dataset") -> h5py.Dataset:
    """f[key] when it is a dataset; otherwise an error naming the file and the key (absent, a link
    that leads nowhere, or a group)."""
    x = h5_node(path, f, key, expected)
    if not isinstance(x, h5py.Dataset):
        fail(path, key, expected, "a group")
    return x


# ----------------------------------------------------------------------------- reading text
# Every text the project reads goes through `decode` (bytes or str -> str) or `read_text` (a whole
# file), and every name (slide id, gene, gene set, barcode, sample id) through `name`: one rule for
# caches' strings and attributes, configs, gene lists, GMT files, CSVs and h5ad string arrays.
BOM = "\ufeff"
_ESCAPED = re.compile("[\udc80-\udcff]")   # bytes h5py could not decode, kept as lone surrogates


def _not_utf8(raw: bytes, at: int) -> str:
    """What a decoding error found: the byte, its neighbours, and a hint for UTF-16 files."""
    hint = " (a UTF-16 file? save it as UTF-8)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    return f"byte 0x{raw[at]:02x} in {raw[max(0, at - 12):at + 12]!r}, which is not UTF-8{hint}"


def decode(raw, where) -> str:
    """bytes or str (h5py returns either, and str with lone surrogates for bytes it could not
    decode) as text: UTF-8, a leading byte-order mark dropped. Text that is not UTF-8 is a
    CacheError naming `where` (the file and the key) and the first bad byte."""
    if isinstance(raw, str):
        if not _ESCAPED.search(raw):
            return raw.removeprefix(BOM)
        raw = raw.encode("utf-8", "surrogateescape")
    raw = bytes(raw)
    try:
        return raw.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as e:
        raise CacheError(f"{where}: expected UTF-8 text, found {_not_utf8(raw, e.start)}") from None


def name(raw, where) -> str:
    """A name read from any file: decoded (`decode`) and stripped of surrounding whitespace, so that
    'ACTB', 'ACTB ' and 'ACTB\\r' are one name everywhere."""
    return decode(raw, where).strip()


def clashes(names) -> list[str]:
    """Names that clash in a list: exact repeats, and names that differ only in case (a file system
    that ignores case keeps one of them; a reader cannot tell them apart), e.g. ["'A' twice", "'b'
    and 'B' (differ only in case)"]. Names are compared as given (`name` has stripped them)."""
    seen, out = {}, []
    for n, k in collections.Counter(str(n) for n in names).items():
        if k > 1:
            out.append(f"{n!r} {k} times" if k > 2 else f"{n!r} twice")
        seen.setdefault(n.lower(), []).append(n)
    out += [" and ".join(map(repr, group)) + " (differ only in case)" for group in seen.values()
            if len(group) > 1]
    return out


def unique_names(names, path, key) -> list[str]:
    """`names` when no two clash (`clashes`); else a CacheError naming the file, the key and
    them."""
    names = [str(n) for n in names]
    found = clashes(names)
    if found:
        fail(path, key, "unique names", f"{len(found)} clashing: {listed(found, 3)}")
    return names


def read_text(path) -> str:
    """A text file as str: UTF-8 (a byte-order mark dropped), Windows and old Mac line endings as
    "\\n". A file that cannot be read, or that is not UTF-8, is a CacheError naming it (and the line
    and column of the first byte that is not UTF-8)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise CacheError(f"{path}: expected a readable text file, found: {e.strerror or e}") \
            from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise CacheError(f"{path}: line {line}, column {column}: expected UTF-8 text, found "
                         f"{_not_utf8(raw, e.start)}") from None
    return text.removeprefix(BOM).replace("\r\n", "\n").replace("\r", "\n")


def h5_strings(ds) -> np.ndarray:
    """Any HDF5 string dataset (fixed or variable length, bytes or str) as a numpy str array of
    names (`name`: UTF-8, surrounding whitespace dropped); a value that is not UTF-8 is a CacheError
    naming the file, the key and the row."""
    raw = np.asarray(ds[()], dtype=object)
    where = f"{ds.file.filename}: key '{ds.name.lstrip('/')}'"
    flat = [name(v, f"{where}, row {i}") for i, v in enumerate(raw.reshape(-1))]
    return np.asarray(flat, dtype=str).reshape(raw.shape)


def text_attr(node, key, default="") -> str:
    """An HDF5 attribute as text (h5py returns bytes or str, by how it was written), stripped; a
    value that is not UTF-8 is a CacheError naming the file and the attribute."""
    value = node.attrs.get(key, default)
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, (bytes, np.bytes_, str)):
        return name(value, f"{node.file.filename}: key 'attrs/{key}'")
    return str(value)


# ----------------------------------------------------------------------------- writing files
class DiskFull(OSError):
    """A write that ran out of space; the message is one line naming the file."""


class TooLarge(ValueError):
    """A size a user asked for that this machine cannot hold; the message gives the figure and a
    size that would fit."""


def _refuse_link(path: Path) -> None:
    """A symbolic link where a command writes: a CacheError (one line in every command)."""
    if path.is_symlink():
        raise CacheError(f"{path}: found a symbolic link (to {os.readlink(path)}) where a "
                         "command writes; refusing to write through or replace it (remove the link "
                         "first)")


def _temporary(path: Path, kind: str) -> Path:
    """A new, empty, hidden file beside `path` (created exclusively: never an existing file or link)
    named .<name>.<pid>.<random>.<kind>: a later command knows a killed process's leftovers by
    it."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name[:180]}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds. A
    symbolic link at `path` is refused (never written through, never replaced). A full disk (ENOSPC,
    from the block or the rename) becomes DiskFull, "<file>: disk full", and the partial temporary
    file is removed: the file at `path`, if any, is left as it was."""
    path = Path(path)
    _refuse_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = _temporary(path, "tmp")
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise disk_full(path, e) from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def disk_full(path, e: OSError) -> OSError:
    """A write error as DiskFull ("<file>: disk full") when the disk is full, else the error itself.
    h5py reports a failed write without errno, with the C library's text."""
    if e.errno == errno.ENOSPC or "No space left on device" in str(e):
        return DiskFull(f"{path}: disk full (no space left on the device to write it)")
    return e


def refuse_existing(outputs, overwrite: bool) -> None:
    """Before a command writes its first file: none of its outputs is a link, and none exists yet
    unless --overwrite."""
    for out in outputs:
        _refuse_link(Path(out))
        if Path(out).exists() and not overwrite:
            raise FileExistsError(f"{out}: already exists; refusing to overwrite it "
                                  "(pass --overwrite)")


def not_an_input(out_dir, *inputs) -> None:
    """Refuse an output folder that is one of the input folders: outputs are never written over
    inputs."""
    if any(Path(out_dir).resolve() == Path(folder).resolve() for folder in inputs):
        raise ValueError(f"{out_dir}: expected an output folder other than the inputs, found an "
                         "input folder")


def check_writable(folder, what: str) -> None:
    """`folder` (or the nearest folder above it that exists) takes a new file: a probe file, created
    and removed (os.access says yes to root on a read-only folder). `what` names its role (e.g.
    "--out")."""
    place = Path(folder)
    while not place.exists() and not place.is_symlink() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        found = "a dangling or looping link" if place.is_symlink() else "a file"
        raise ValueError(f"{place}: {what}: expected a folder for {folder}, found {found}")
    try:
        handle, probe = tempfile.mkstemp(dir=place, prefix=".tessera-write-probe-")
        os.close(handle), os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{place}: {what}: expected a folder this user can write {folder} in, "
                         f"found it cannot be written ({e.strerror or e})") from None


def plain_name(value, where) -> str:
    """A name that comes from data (a slide id, a gene, a barcode) and is about to become a file
    name: refused unless it is a plain file name, so that a file's content never decides where a
    command writes: not empty, not '.' or '..', no '/', '\\', control character or leading '.', at
    most 200 bytes."""
    text = str(value)
    bad = ("empty" if not text else "'.' or '..'" if text in (".", "..") else
           "a path ('/' or '\\' in it)" if "/" in text or "\\" in text else
           "a hidden name (leading '.')" if text.startswith(".") else
           "a control character" if any(ord(c) < 32 or ord(c) == 127 for c in text) else
           "longer than 200 bytes" if len(text.encode("utf-8", "surrogateescape")) > 200 else "")
    if bad:
        raise CacheError(f"{where}: expected a plain file name, found {text[:80]!r} ({bad}); a "
                         "name from a file's content never decides where a command writes")
    return text


def refuse_links(path, named) -> None:
    """No symbolic link at `path` nor at a folder between it and the folder the user named (`named`,
    itself allowed to be a link: the user chose it): the folders a command chooses inside a user's
    folder (RUN/plots) are never links that lead elsewhere."""
    path, named = Path(path), Path(named)
    for place in [path, *path.parents]:
        if place == named or place in named.parents:
            break
        _refuse_link(place)


def h5_bytes(path) -> int:
    """The bytes the datasets of an HDF5 file take once read (shape x item size, whatever the
    compression): what reading it whole will allocate."""
    total = []
    with open_h5(path, "file") as f:
        f.visititems(lambda _, x: total.append(x.size * x.dtype.itemsize)
                     if isinstance(x, h5py.Dataset) else None)
    return sum(total)


WRITING = ".tessera-writing"   # in a folder while a command renames its outputs into place


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a killed writer's leftovers are
    stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return pid > 0


def _marker(folder: Path) -> dict | None:
    """The record an interrupted Outputs.commit left in `folder` ({command, pid, host, names}), or
    None."""
    path = folder / WRITING
    if not path.exists():
        return None
    try:
        record = json.loads(read_text(path))
        return record if isinstance(record, dict) else {}
    except (CacheError, ValueError):
        return {}


def check_finished(folder) -> None:
    """Refuse to read a folder whose writer was killed while putting its files into place: some of
    them are complete and some are not there yet, and the folder must not pass for a whole
    dataset."""
    record = _marker(Path(folder))
    if record is None:
        return
    who = record.get("command") or "a tessera command"
    pid = record.get("pid") if isinstance(record.get("pid"), int) else 0
    busy = record.get("host") == socket.gethostname() and _alive(pid)
    raise CacheError(f"{Path(folder) / WRITING}: {folder} is unfinished: `{who}` "
                     + (f"(process {pid}) is writing it now; wait for it to finish" if busy else
                        "was interrupted while writing it; run it again to finish it"))


class Outputs:
    """The one way a command writes its files into a folder: every output is checked before the
    first one is written, written under a hidden name, and renamed into place only when the whole
    command has succeeded (all or nothing: an error, a kill or Ctrl-C half-way leaves no output).

    Checked: each output name is a plain file name (`plain_name`: a name from a file's content never
    leads outside `folder`) and no two clash (`clashes`); no link between the folder the user named
    (`named`, default `folder`) and the files; the folder takes files (`check_writable`) and is none
    of the `inputs` (files or folders the command reads); an output is never one of the inputs, and
    never replaces an existing file unless `overwrite`. A kill during the renames leaves the folder
    marked (WRITING): readers refuse it (check_finished), and the same `command` run again finishes
    it. Leftovers of killed processes (hidden .pending and .tmp files) are removed and named.

        with Outputs(out, ["a.h5", "b.h5"], overwrite, inputs=[src], command="x.py") as out:
            write(out.path("a.h5"))     # written, not yet visible as a.h5
    """

    def __init__(self, folder, names, overwrite: bool = False, inputs=(), named=None, what="--out",
                 command: str = "", log=print):
        self.folder, self.command, self.log = Path(folder), command, log
        self.names = [plain_name(n, f"{self.folder}: output") for n in names]
        found = clashes(self.names)
        if found:
            raise CacheError(f"{self.folder}: expected one output per name, found {len(found)} "
                             f"clashing output names: {listed(found, 3)} (one file would replace "
                             "the other)")
        refuse_links(self.folder, self.folder if named is None else named)
        sources = {Path(p).resolve() for p in inputs}
        if self.folder.resolve() in sources:
            raise ValueError(f"{self.folder}: {what}: expected an output folder other than the "
                             "inputs, found an input folder")
        check_writable(self.folder, what)
        record = _marker(self.folder)
        if record is not None and (record.get("command") != command or not command):
            check_finished(self.folder)
        ours = set(record.get("names") or []) if record else set()
        existing = []
        for n in self.names:
            path = self.folder / n
            _refuse_link(path)
            if path.resolve() in sources:
                raise ValueError(f"{path}: {what}: expected an output that is not one of the "
                                 "inputs, found an input file (it would be replaced by its own "
                                 "output)")
            if path.exists() and n not in ours:
                existing.append(str(path))
        if existing and not overwrite:
            raise FileExistsError(f"{existing[0]}: already exists ({len(existing)} of the "
                                  f"{len(self.names)} outputs exist); refusing to overwrite "
                                  "(choose another output folder or pass --overwrite)")
        if record:
            log(f"note: {self.folder}: `{command}` was interrupted while renaming its outputs into "
                "place; writing them again")
        self._clean_leftovers()
        self.pending: dict[str, Path] = {}
        # a folder that does not exist yet is built whole under a hidden name beside it and renamed
        # into place in one step: a kill never leaves it half there
        self.staging = None if self.folder.exists() else \
            self.folder.with_name(f".{self.folder.name[:180]}.{os.getpid()}.{secrets.token_hex(4)}"
                                  ".pending")
        self.created = next((p for p in [*reversed(self.folder.parents), self.folder]
                             if not p.exists()), None)    # the first folder this command makes

    def _clean_leftovers(self) -> None:
        """Hidden .pending / .tmp files of killed processes, for the names this command writes, and
        the hidden folders a killed process was building in place of this folder."""
        pattern = re.compile(r"^\.(.+)\.(\d+)\.[0-9a-f]{8}\.(pending|tmp)$")
        mine, stale = {n[:180] for n in self.names}, []
        for place, names in ((self.folder, mine), (self.folder.parent, {self.folder.name[:180]})):
            for p in place.iterdir() if place.is_dir() else []:
                m = pattern.match(p.name)
                if m and m.group(1) in names and not _alive(int(m.group(2))):
                    stale.append(p)
        for p in stale:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        if stale:
            self.log(f"note: {self.folder}: removed {len(stale)} unfinished file(s) an interrupted "
                     f"command left ({listed(sorted(p.name for p in stale), 3)})")

    def path(self, output: str) -> Path:
        """Where to write output `output` now: a hidden file beside its final name, renamed at the
        end."""
        if output not in self.names:
            raise ValueError(f"{self.folder}: {output!r} is not one of the outputs checked "
                             "beforehand")
        if output not in self.pending:
            if self.staging is not None:
                self.staging.mkdir(parents=True, exist_ok=True)
                self.pending[output] = self.staging / output
            else:
                self.pending[output] = _temporary(self.folder / output, "pending")
        return self.pending[output]

    def commit(self) -> list[Path]:
        """Rename every written output into place, under a marker a kill half-way leaves behind."""
        marker, done = self.folder / WRITING, []
        if self.staging is not None and self.pending:
            try:
                os.rename(self.staging, self.folder)   # the whole new folder at once
                self.pending = {}
                return [self.folder / n for n in self.names if (self.folder / n).exists()]
            except OSError:                             # made meanwhile: its files one by one
                self.folder.mkdir(parents=True, exist_ok=True)
        if self.pending:
            with atomic_path(marker) as tmp:
                tmp.write_text(json.dumps({"command": self.command, "pid": os.getpid(),
                                           "host": socket.gethostname(),
                                           "names": list(self.pending)}))
        for n, tmp in self.pending.items():
            _refuse_link(self.folder / n)
            os.replace(tmp, self.folder / n)
            done.append(self.folder / n)
        marker.unlink(missing_ok=True)
        self.pending = {}
        if self.staging is not None and self.staging.is_dir():
            shutil.rmtree(self.staging)
        return done

    def discard(self) -> None:
        """Remove what was written, and the folders this command made if they are left empty."""
        for tmp in self.pending.values():
            tmp.unlink(missing_ok=True)
        self.pending = {}
        if self.staging is not None and self.staging.is_dir():
            shutil.rmtree(self.staging)
        if self.created is not None:
            for place in [self.folder, *self.folder.parents]:
                with contextlib.suppress(OSError):
                    place.rmdir()                       # only an empty folder goes
                if place == self.created:
                    break

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is not None:
            self.discard()
            return False
        try:
            self.commit()
        except OSError as e:
            self.discard()
            raise disk_full(self.folder, e) from None
        return False


# ----------------------------------------------------------------------------- memory and disk
def available_memory(device=None) -> int | None:
    """Bytes free for a command: the GPU's free memory on CUDA (None when there is no such device),
    else /proc/meminfo's MemAvailable (or the free pages)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def check_memory(need: float, what: str, fits: str, device=None,
                 available: int | None = None) -> None:
    """Refuse, before allocating, work that needs about `need` bytes when the machine (or `device`)
    has less free: TooLarge naming `what`, the figure, what is free, and `fits` (a value that would
    fit)."""
    free = available_memory(device) if available is None else available
    if free is not None and need > free:
        raise TooLarge(f"{what} needs about {gib(need)} of memory, found {gib(free)} available on "
                       f"{torch.device(device or 'cpu')}; {fits}")


def free_disk(folder) -> int:
    """Bytes free on the disk that holds `folder` (or the nearest folder above it that exists)."""
    place = Path(folder)
    while not place.is_dir() and place != place.parent:
        place = place.parent
    return shutil.disk_usage(place).free


def check_disk(need: float, folder, what: str, fits: str, available: int | None = None) -> None:
    """Refuse output of about `need` bytes that the disk of `folder` cannot take (TooLarge, as
    check_memory)."""
    free = free_disk(folder) if available is None else available
    if need > free:
        raise TooLarge(f"{what} needs about {gib(need)} of disk, found {gib(free)} free at "
                       f"{folder}; {fits}")


def largest_fitting(size, lo: int, hi: int, budget: float) -> int:
    """The largest integer n in [lo, hi] with size(n) <= budget (size increasing), or lo - 1: the
    value a refusal proposes instead of the user's."""
    if size(lo) > budget:
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid - 1)
    return lo


# ------------------------------------------------------------------- numeric values, block by block
COUNT_KEYS = ("counts", "library_size", "expected", "sub_counts")
# (hest.py's names)
FEATURE_KEYS = ("features", "pseudo_features", "sub_features", "embeddings", "sub_embeddings")
# Features beyond this magnitude are refused: float16 caches hold at most 65504, patch embeddings
# are of order 1-100, and the models standardise features with sums of squares in float32, where
# values near 1e19 (and a slide's worth of values near 1e16) overflow to inf and make every
# prediction of the slide NaN.
FEATURE_BOUND = 1e6
# values per block when a dataset is checked from the file in blocks of rows (scan_slide)
BLOCK = 1 << 24

def _bad(found: dict, name: str, mask: np.ndarray, offset: int) -> None:
    """Add a block's bad values to found[name] = [count, index of the first]."""
    if mask.any():
        first = np.argwhere(mask)[0]
        first[0] += offset
        count = found.setdefault(name, [0, tuple(int(i) for i in first)])
        count[0] += int(mask.sum())


def _blocks(x):
    """(first row, rows) of a numpy array (all of it) or of an h5py dataset (blocks of about BLOCK
    values, so a slide is checked without holding it in memory)."""
    if isinstance(x, np.ndarray) or x.ndim == 0:
        yield 0, np.asarray(x)
        return
    step = max(1, BLOCK // max(1, int(np.prod(x.shape[1:]))))
    for start in range(0, len(x), step):
        yield start, x[start:start + step]


def check_values(path, key: str, x, counts: bool = False) -> int:
    """Values of a numeric array (or dataset), block by block: finite in float32; counts
    (COUNT_KEYS, or any key with counts=True) >= 0; features within FEATURE_BOUND. Returns the
    number of non-integer values of `counts` (0 for other keys)."""
    found, fractional, largest = {}, 0, 0.0
    for start, block in _blocks(x):
        with np.errstate(over="ignore", invalid="ignore"):
            x = block.astype(np.float32)
        finite = np.isfinite(x)                     # also catches values outside the float32 range
        _bad(found, "finite", ~finite, start)
        if key in COUNT_KEYS or counts:
            _bad(found, "negative", block < 0, start)
        if key in FEATURE_KEYS:
            size = np.abs(np.where(finite, x, 0))
            _bad(found, "large", size > FEATURE_BOUND, start)
            largest = max(largest, float(size.max(initial=0)))
        if key == "counts" and block.dtype.kind == "f":
            fractional += int((finite & (block != np.round(block))).sum())
    text = {k: f"{n} bad values, first at index {first}" for k, (n, first) in found.items()}
    if "finite" in found:
        fail(path, key, "finite float32 values", text["finite"])
    if "negative" in found:
        fail(path, key, "values >= 0", f"negative values: {text['negative']}")
    if "large" in found:
        fail(path, key, f"features of magnitude <= {FEATURE_BOUND:g} (larger values overflow the "
             "standardisation)", f"values up to {largest:.3g}: {text['large']}")
    return fractional


def _array(x, dtype=np.float64) -> np.ndarray:
    """A tensor or array-like as a numpy array of `dtype` (float64 or float32; bf16 tensors
    included)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64 if dtype == np.float64 else torch.float32).numpy()
    return np.asarray(x, dtype=dtype)


# ----------------------------------------------------------------------------- small text formats
def read_gmt(path) -> dict[str, list[str]]:
    """MSigDB GMT: one gene set per line, `name <tab> url <tab> gene <tab> gene ...` (read_text,
    names stripped). A set name twice, or two names that differ only in case, are refused (the later
    set would replace the earlier); a gene repeated inside a set counts once."""
    sets, line_of = {}, {}
    for i, line in enumerate(read_text(path).split("\n"), 1):
        if line.strip():
            parts = line.split("\t")
            if len(parts) < 3:
                raise CacheError(f"{path}: line {i}: expected 'name<TAB>url<TAB>genes...', found "
                                 f"{line[:60]!r}")
            key = name(parts[0], f"{path}: line {i}")
            if key.casefold() in line_of:
                first = line_of[key.casefold()]
                raise CacheError(f"{path}: line {i}: expected each gene set once, found {key!r} "
                                 f"again (line {first[0]}: {first[1]!r})")
            line_of[key.casefold()] = (i, key)
            genes = [name(g, f"{path}: line {i}") for g in parts[2:]]
            sets[key] = unique_names(dict.fromkeys(g for g in genes if g), f"{path}: line {i}",
                                     key)
    return sets


def read_gene_list(path) -> list[str]:
    """A gene list: JSON {"genes": [...]} (HEST-Benchmark) or a JSON list, or text with one gene per
    line ('#' starts a comment line). Read as every text is (read_text, names stripped); names that
    clash (`clashes`), entries that are not strings, and JSON that does not parse are refused."""
    text = read_text(path)
    if text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CacheError(f"{path}: line {e.lineno}, column {e.colno}: expected JSON "
                             f"({{\"genes\": [...]}} or a list), found: {e.msg}") from None
        genes = data["genes"] if isinstance(data, dict) and "genes" in data else data
        if not isinstance(genes, list):
            raise CacheError(f"{path}: key 'genes': expected a list of gene names, found "
                             f"{type(genes).__name__}")
        wrong = [(i, g) for i, g in enumerate(genes) if not isinstance(g, str) or not g.strip()]
        if wrong:
            raise CacheError(f"{path}: key 'genes': expected gene names (non-empty strings), found "
                             f"{wrong[0][1]!r} at position {wrong[0][0]} ({len(wrong)} in all)")
        genes = [name(g, path) for g in genes]
    else:
        genes = [name(s, path) for s in text.split("\n") if s.strip() and not s.startswith("#")]
    found = clashes(genes)
    if found:
        raise CacheError(f"{path}: key 'genes': expected unique names, found duplicates "
                         f"{listed(found)}")
    return genes


def _csv_rows(path, columns: tuple) -> tuple[list[dict], str]:
    """Rows of a CSV file (read_text: UTF-8, BOM, line endings; header and cells stripped) and the
    first of `columns` it has; rows whose cell in that column is empty are refused."""
    reader = csv.reader(io.StringIO(read_text(path)))
    try:
        table = [[name(c, path) for c in row] for row in reader]
    except csv.Error as e:
        raise CacheError(f"{path}: line {reader.line_num}: expected CSV, found: {e}") from None
    header, rows = (table[0], table[1:]) if table else ([], [])
    rows = [dict(zip(header, row)) for row in rows if any(row)]
    key = next((k for k in columns if rows and k in header), None)
    if key is None:
        fail(path, columns[0], f"a column {' or '.join(columns)} and rows", header or "no rows")
    empty = [i for i, r in enumerate(rows, 2) if not r.get(key)]
    if empty:
        fail(path, key, "an id in every row", f"an empty cell in row {empty[0]}")
    return rows, key


def read_metadata(path) -> dict[str, dict[str, str]]:
    """metadata.csv rows keyed by the `id` (or `sample_id`) column (ids that clash are refused)."""
    rows, key = _csv_rows(path, ("id", "sample_id"))
    unique_names([r[key] for r in rows], path, key)
    return {r[key]: r for r in rows}


def read_split_csvs(folder) -> list[tuple[list[str], list[str]]]:
    """HEST-Benchmark splits: train_{i}.csv / test_{i}.csv with a `sample_id` column, i = 0, 1, ...;
    an id listed twice in one file (or twice but for case) is refused."""
    folds, folder = [], Path(folder)
    while any((folder / f"{part}_{len(folds)}.csv").exists() for part in ("train", "test")):
        pair = [folder / f"{part}_{len(folds)}.csv" for part in ("train", "test")]
        for p in pair:
            if not p.exists():
                raise FileNotFoundError(f"{p}: expected beside its partner split file, found "
                                        "nothing")
        train, test = (unique_names([r["sample_id"] for r in _csv_rows(p, ("sample_id",))[0]], p,
                                    "sample_id") for p in pair)
        folds.append((train, test))
    if not folds:
        raise FileNotFoundError(f"{folder}: expected train_0.csv and test_0.csv, found none")
    return folds


# ----------------------------------------------------------------------------- prediction files
def write_predictions(path, pred, genes, barcodes, coords, true=None, slide_id=None, std=None,
                      n_models=None, levels=None, lower=None, upper=None, interval=None,
                      ridge_alone=False) -> None:
    """One h5 per slide: `pred` (N, G) float32 log1p space, `genes`, `barcodes`, `coords` (N, 2),
    optional `true` and `std` (N, G) and `n_models` (G,) (fold models behind each gene); `lower`,
    `upper` (N, G) a prediction interval of nominal coverage `interval` (attribute, e.g. 0.9);
    `levels` {k: {"pred", "coords", ["true"], ["copy"]}} (`level_outputs`) as groups `level_<k>`;
    attribute `ridge_alone`: every model predicted the slide by its spatial ridge alone
    (model.ood_fallback);
    written to a temporary name and renamed."""
    # float32 directly, no float64 copy: (N, G) is 8 GB at 1M spots x 2,000 genes
    pred, coords = _array(pred, np.float32), _array(coords, np.float32)
    n, g = pred.shape
    extra = {k: None if v is None else _array(v, np.float32)
             for k, v in (("true", true), ("std", std), ("lower", lower), ("upper", upper))}
    found = {"genes": (len(genes),), "barcodes": (len(barcodes),), "coords": coords.shape,
             **{k: (n, g) if v is None else v.shape for k, v in extra.items()},
             "n_models": (g,) if n_models is None else np.shape(n_models)}
    expected = {"genes": (g,), "barcodes": (n,), "coords": (n, 2), "true": (n, g), "std": (n, g),
                "n_models": (g,), "lower": (n, g), "upper": (n, g)}
    problems = [f"{k} has shape {found[k]}, expected {expected[k]}" for k in found
                if found[k] != expected[k]]
    if (lower is None) != (upper is None) or (lower is not None) != (interval is not None):
        problems.append("lower, upper and interval go together")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    strings = h5py.string_dtype("utf-8")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f["pred"] = pred
        f.create_dataset("genes", data=[str(x) for x in genes], dtype=strings)
        f.create_dataset("barcodes", data=[str(x) for x in barcodes], dtype=strings)
        f["coords"] = coords
        for k, v in extra.items():
            if v is not None:
                f[k] = v
        if n_models is not None:
            f["n_models"] = np.asarray(n_models, dtype=np.int32)
        for k, group in (levels or {}).items():
            for key, x in group.items():
                f[f"level_{k}/{key}"] = _array(x, np.float32)
        f.attrs["slide_id"] = str(slide_id if slide_id is not None else Path(path).stem)
        f.attrs["ridge_alone"] = bool(ridge_alone)
        if interval is not None:
            f.attrs["interval"] = float(interval)


def read_predictions(path) -> dict:
    """Inverse of write_predictions: {slide_id, pred, genes (list), barcodes, coords, true, std,
    n_models, lower, upper, interval} (None where absent), ridge_alone (False where absent) and
    levels {k: {pred, coords, [true], [copy]}}; a damaged file: a CacheError naming it."""
    with open_h5(path, "prediction file") as f:
        need, get = (lambda k: dataset(path, f, k)), (lambda k: f[k][:] if k in f else None)
        try:  # a truncated or damaged file fails while its data are read
            return {"slide_id": str(f.attrs.get("slide_id", Path(path).stem)),
                    "pred": need("pred")[:], "genes": list(need("genes").asstr()[:]),
                    "barcodes": need("barcodes").asstr()[:].astype(str),
                    "coords": need("coords")[:], "true": get("true"), "std": get("std"),
                    "n_models": get("n_models"), "lower": get("lower"), "upper": get("upper"),
                    "interval": f.attrs.get("interval"),
                    "ridge_alone": bool(f.attrs.get("ridge_alone", False)),
                    "levels": {int(n[6:]): {k: f[n][k][:] for k in f[n]} for n in f
                               if n.startswith("level_")}}
        except (OSError, KeyError) as e:
            raise CacheError(f"{path}: expected a readable prediction file, found: {e}") from None


def missing_test_slides(run, fold) -> str:
    """A line naming the test slides of `fold` (fold_<k>) in the run's folds.json that have no
    prediction file fold_<k>/pred/<slide>.h5; "" when there are none or the run has no
    folds.json."""
    record, k, pred = Path(run) / "folds.json", int(Path(fold).name[5:]), Path(fold) / "pred"
    folds = json.loads(record.read_text())["folds"] if record.exists() else []
    lost = [s for s in (folds[k]["test"] if k < len(folds) else [])
            if not (pred / f"{s}.h5").exists()]
    return (f"{pred}: no prediction file of test slide(s) {listed(lost, 8)} (folds.json)" if lost
            else "")


class CSR(NamedTuple):
    """A sparse matrix in compressed sparse row form, as AnnData stores one."""
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple


def _h5ad_put(group, key, value) -> None:
    """One entry in AnnData's on-disk format (anndata.readthedocs.io, "On-disk format"): arrays, CSR
    matrices, string arrays, string and numeric scalars, dicts as groups."""
    if isinstance(value, CSR):
        sub = group.create_group(key)
        sub.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                          "shape": value.shape})
        sub["data"], sub["indices"], sub["indptr"] = value.data, value.indices, value.indptr
    elif isinstance(value, dict):
        sub = group.create_group(key)
        sub.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        for k, v in value.items():
            _h5ad_put(sub, str(k), v)
    elif isinstance(value, str):
        group.create_dataset(key, data=value, dtype=h5py.string_dtype("utf-8"))
        group[key].attrs.update({"encoding-type": "string", "encoding-version": "0.2.0"})
    elif np.ndim(value) == 0:
        group[key] = value
        group[key].attrs.update({"encoding-type": "numeric-scalar", "encoding-version": "0.2.0"})
    elif np.asarray(value).dtype.kind in "USO":
        group.create_dataset(key, data=[str(x) for x in value], dtype=h5py.string_dtype("utf-8"))
        group[key].attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
    else:
        group[key] = np.asarray(value)
        group[key].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})


def write_h5ad(path, pred, genes, barcodes, coords, std=None, true=None, n_models=None,
               uns=None, obs=None, lower=None, upper=None) -> None:
    """An AnnData file (h5py only) that anndata.read_h5ad, scanpy and squidpy open: X = predicted
    expression (N, G), layers `std` / `true` / `lower` / `upper` (an interval; its level in `uns`)
    when given, obs index = barcodes (columns `obs`, a dict of (N,) arrays), var index = genes
    (column `n_models` when given), obsm['spatial'] = coords in micrometres, `uns` a dict of
    strings, numbers and arrays (uns['spatial']: `visium_spatial`)."""
    write_anndata(path, _array(pred, np.float32), barcodes, genes, obs=obs,
                  var={} if n_models is None else {"n_models": n_models},
                  layers={k: _array(v, np.float32)
                          for k, v in dict(std=std, true=true, lower=lower, upper=upper).items()
                          if v is not None},
                  obsm={"spatial": _array(coords, np.float32)}, uns=uns)


def write_anndata(path, X, obs_names, var_names, obs=None, var=None, layers=None, obsm=None,
                  uns=None) -> None:
    """An AnnData file, h5py only: X (an array or a CSR), obs / var dataframes (index + numeric
    columns), layers, obsm, uns (dicts of arrays, strings and numbers)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        _h5ad_put(f, "X", X)
        for name, index, columns in (("obs", obs_names, obs or {}), ("var", var_names, var or {})):
            frame = f.create_group(name)
            frame.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0",
                                "_index": "_index"})
            frame.attrs.create("column-order", np.array(list(columns), dtype=object),
                               dtype=h5py.string_dtype("utf-8"))
            _h5ad_put(frame, "_index", np.array([str(x) for x in index], dtype=object))
            for k, v in columns.items():
                _h5ad_put(frame, k, np.asarray(v))
        for name, value in (("layers", layers or {}), ("obsm", obsm or {}), ("uns", uns or {}),
                            ("obsp", {}), ("varm", {}), ("varp", {})):
            _h5ad_put(f, name, value)


# ---------------------------------------------------------------------- AnnData reading (h5py only)

@dataclass
class H5ad:
    counts: np.ndarray              # (N, G) float32, the requested genes in the requested order
    barcodes: np.ndarray            # (N,) str, the obs index
    genes: list[str]                # (G,)
    xy: np.ndarray | None           # (N, 2) float64 spot centres in
                                    # full-resolution pixels, x then y
    obs: dict[str, np.ndarray]      # obs columns (categoricals decoded; missing entries None)
    library_size: np.ndarray        # (N,) float64 total counts over all genes of the file


def _enc(node) -> str:
    return text_attr(node, "encoding-type")


def _member(f, group, key) -> h5py.Dataset:
    """group[key] when it is a dataset; otherwise an error naming the file and the key (its full
    name: obs/region/codes)."""
    where = f"{group.name.strip('/')}/{key}".lstrip("/")
    if key not in group:
        fail(f.filename, where, "a dataset", "no such key")
    try:
        x = group[key]
    except (KeyError, OSError):
        fail(f.filename, where, "a dataset", "a link that leads nowhere")
    if not isinstance(x, h5py.Dataset):
        fail(f.filename, where, "a dataset", "a group")
    return x


def h5ad_array(f, node):
    """A column or index: plain array, string array, or categorical in the old or current anndata
    encoding; categorical codes must point into their categories."""
    where = node.name.lstrip("/")
    if isinstance(node, h5py.Group):
        if _enc(node) == "categorical":                              # anndata >= 0.8
            codes = _member(f, node, "codes")[()]
            cats = h5ad_array(f, _member(f, node, "categories"))
        elif _enc(node).startswith("nullable"):
            values = h5ad_array(f, _member(f, node, "values")).astype(object)
            mask = _member(f, node, "mask")[()]
            if mask.shape != values.shape:
                fail(f.filename, f"{where}/mask", f"shape {values.shape} as 'values'", mask.shape)
            values[mask.astype(bool)] = None
            return values
        else:
            raise CacheError(f"{f.filename}: key '{node.name}': expected an array or categorical, "
                             f"found encoding '{_enc(node)}'")
    elif "categories" in node.attrs:  # anndata < 0.8: codes + reference
        codes, cats = node[()], h5ad_array(f, f[node.attrs["categories"]])
    elif h5py.check_string_dtype(node.dtype) or node.dtype.kind == "S":
        return h5_strings(node)
    else:
        return node[()]
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iu" or (codes.size and codes.max() >= len(cats)):
        fail(f.filename, where, f"categorical codes from -1 to {len(cats) - 1} (its categories)",
             f"{codes.dtype} codes up to {codes.max() if codes.size else 'none'}")
    out = np.asarray(cats, dtype=object)[np.maximum(codes, 0)]
    out[codes < 0] = None
    return out


def h5ad_frame(f, key) -> tuple[np.ndarray, dict]:
    """(index, columns) of obs or var; the index dataset is whichever `_index` names (its names read
    as every name is, files.name)."""
    if key not in f:
        fail(f.filename, key, "a dataframe group (AnnData)", "no such key")
    g = h5_node(f.filename, f, key, "a dataframe group (AnnData)")
    if not isinstance(g, h5py.Group):
        fail(f.filename, key, "a dataframe group (anndata >= 0.7)",
             "a dataset (re-save with a newer anndata)")
    index = text_attr(g, "_index", "_index")
    cols = {k: h5ad_array(f, h5_node(f.filename, g, k)) for k in g
            if k not in (index, "__categories")}
    names = h5ad_array(f, _member(f, g, index))
    if names.ndim != 1 or any(v is None for v in names):
        fail(f.filename, f"{key}/{index}", "one name per row", "missing or nested names")
    return np.asarray([str(v) for v in names], dtype=str).reshape(-1), cols


def _check_sparse(path, X, fmt: str, shape: tuple, indptr, indices, data) -> None:
    """A CSR / CSC matrix as AnnData stores one: indptr from 0, non-decreasing, one entry per major
    row + 1, ending at the number of values; indices within the minor axis."""
    major, minor = shape if fmt == "csr" else shape[::-1]
    key = X.name.lstrip("/")
    for part, x in (("indptr", indptr), ("indices", indices)):
        if x.ndim != 1 or x.dtype.kind not in "iu":
            fail(path, f"{key}/{part}", "a 1-D integer array", f"{x.dtype} shape {x.shape}")
    if data.ndim != 1 or len(data) != len(indices):
        fail(path, f"{key}/data", f"one value per entry of '{key}/indices' ({len(indices)})",
             f"shape {data.shape}")
    if len(indptr) != major + 1 or indptr[0] != 0 or indptr[-1] != len(indices) or \
            (np.diff(indptr) < 0).any():
        fail(path, f"{key}/indptr", f"{major + 1} non-decreasing offsets from 0 to {len(indices)} "
             f"({fmt}, shape {shape})", f"{len(indptr)} offsets from {indptr[:1]} to {indptr[-1:]}"
             f"{', decreasing' if (np.diff(indptr) < 0).any() else ''}")
    bad = (indices < 0) | (indices >= minor)
    if bad.any():
        i = int(np.argmax(bad))
        fail(path, f"{key}/indices", f"indices from 0 to {minor - 1}",
             f"{int(bad.sum())} outside, first {int(indices[i])} at entry {i}")


def h5ad_matrix(f, counts: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """X as coordinates (rows, cols, values) and shape; CSR, CSC (current or old h5sparse) or dense.
    The sparse arrays are checked (_check_sparse) and the values are finite (counts: and >= 0; an
    AnnData file of predictions holds log values below 0)."""
    if "X" not in f:
        fail(f.filename, "X", "the count matrix (AnnData)", "no such key")
    X = h5_node(f.filename, f, "X", "the count matrix (AnnData)")
    if isinstance(X, h5py.Dataset):
        if X.ndim != 2 or X.dtype.kind not in "fiub":
            fail(f.filename, "X", "a 2-D numeric count matrix", f"{X.dtype} shape {X.shape}")
        dense = X[()]
        check_values(f.filename, "X", dense, counts=counts)
        rows, cols = np.nonzero(dense)
        return rows, cols, dense[rows, cols].astype(np.float64), dense.shape
    fmt = _enc(X).replace("_matrix", "") or text_attr(X, "h5sparse_format")
    if fmt not in ("csr", "csc"):
        raise CacheError(f"{f.filename}: key 'X': expected dense, csr_matrix or csc_matrix, found "
                         f"'{fmt}'")
    shape = np.asarray(X.attrs.get("shape", X.attrs.get("h5sparse_shape", ())))
    if shape.shape != (2,) or shape.dtype.kind not in "iu" or (shape < 0).any():
        fail(f.filename, "X", "the attribute shape (rows, columns)", f"{shape.tolist()}")
    shape = tuple(int(s) for s in shape)
    indptr, indices, data = (_member(f, X, k)[()] for k in ("indptr", "indices", "data"))
    _check_sparse(f.filename, X, fmt, shape, indptr, indices, data)
    if data.dtype.kind not in "fiub":
        fail(f.filename, "X/data", "numeric counts", f"dtype {data.dtype}")
    check_values(f.filename, "X/data", data, counts=counts)
    major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    rows, cols = (major, indices) if fmt == "csr" else (indices, major)
    return rows, cols, data.astype(np.float64), shape


XY_COLUMNS = (("pxl_col_in_fullres", "pxl_row_in_fullres"), ("x_pixel", "y_pixel"), ("x", "y"),
              ("imagecol", "imagerow"))


def h5ad_xy(f, obs: dict) -> np.ndarray | None:
    """(N, 2) spot centres in pixels: obsm/spatial, else the first pair of XY_COLUMNS in obs; None
    if neither. Centres that are not finite numbers are refused (a bin or a spot at NaN is no
    place)."""
    if "obsm" in f and "spatial" in f["obsm"]:
        key, xy = "obsm/spatial", dataset(f.filename, f, "obsm/spatial")[()]
        if xy.ndim != 2 or xy.dtype.kind not in "fiu":
            fail(f.filename, key, "shape (N, 2): numeric spot centres",
                 f"{xy.dtype} shape {xy.shape}")
        xy = xy[:, :2]
    else:
        pair = next(((a, b) for a, b in XY_COLUMNS if a in obs and b in obs), None)
        if pair is None:
            return None
        key, xy = f"obs/{pair[0]}, obs/{pair[1]}", np.stack([obs[pair[0]], obs[pair[1]]], 1)
    try:
        xy = np.asarray(xy, dtype=np.float64)
    except (TypeError, ValueError):
        fail(f.filename, key, "numeric spot centres", "values that are not numbers")
    bad = ~np.isfinite(xy).all(1)
    if bad.any():
        fail(f.filename, key, "finite spot centres",
             f"{int(bad.sum())} rows with NaN or inf, first row {int(np.argmax(bad))}")
    return xy


def read_h5ad_sparse(path, counts: bool = False) -> tuple[np.ndarray, dict, np.ndarray, tuple,
                                                         np.ndarray | None]:
    """An AnnData file as it is stored, its parts checked against each other: (obs index, obs
    columns, var index, X as (rows, cols, values), xy or None). X stays sparse: a cell table can be
    large. counts=True: X must hold counts (>= 0), as the import and the binning need."""
    with open_h5(path, "AnnData file") as f:
        barcodes, obs = h5ad_frame(f, "obs")
        var_names, _ = h5ad_frame(f, "var")
        rows, cols, values, shape = h5ad_matrix(f, counts)
        xy = h5ad_xy(f, obs)
    n = len(barcodes)
    if shape != (n, len(var_names)):
        fail(path, "X", f"shape ({n}, {len(var_names)}) from obs and var", f"{shape}")
    if xy is not None and xy.shape != (n, 2):
        fail(path, "obsm/spatial", f"shape ({n}, 2)", f"{xy.shape}")
    return barcodes, obs, var_names, (rows, cols, values), xy


def read_h5ad(path, genes: list[str] | None = None, rename=None, counts: bool = False) -> H5ad:
    """Counts, barcodes, genes, spot centres and obs columns of an AnnData .h5ad file, without
    anndata. rename (HiST A.1: protocols.harmonise_gene_names) maps the gene names; the columns that
    then share a name, and the rows that share a barcode, are summed (first-seen order; obs and xy
    of the first row). Without rename, gene names or barcodes that clash (`clashes`) are refused:
    one of them would be lost. counts=True: X must hold counts (>= 0)."""
    barcodes, obs, var_names, (rows, cols, values), xy = read_h5ad_sparse(path, counts)
    n = len(barcodes)
    names = list(var_names) if rename is None else list(rename(var_names))
    if rename is None:
        for key, items in (("var", names), ("obs", barcodes)):
            found = clashes(items)
            if found:
                fail(path, f"{key}/_index", "unique names (--harmonise sums genes and spots that "
                     "share a name)", f"{len(found)} clashing: {listed(found, 3)}")
    row_of = np.arange(n)
    if rename is not None:                          # duplicated barcodes: one row each, summed
        first = {}
        row_of = np.array([first.setdefault(b, len(first)) for b in barcodes], dtype=np.int64)
        keep_row = np.unique(row_of, return_index=True)[1]
        barcodes, xy = barcodes[keep_row], None if xy is None else xy[keep_row]
        obs = {k: np.asarray(v)[keep_row] for k, v in obs.items()}
    index = {}
    for i, g in enumerate(names):                   # duplicated names (rename): all columns, summed
        index.setdefault(g, []).append(i)
    genes = list(index) if genes is None else list(genes)
    missing = [g for g in genes if g not in index]
    if missing:
        fail(path, "var", f"all {len(genes)} requested genes",
             f"{len(missing)} missing: {listed(missing, 10)}")
    column_of = np.full(len(var_names), -1)
    for j, g in enumerate(genes):
        column_of[index[g]] = j
    keep = column_of[cols] >= 0
    counts = np.zeros((len(barcodes), len(genes)), dtype=np.float64)
    # duplicated entries sum, as in scipy
    np.add.at(counts, (row_of[rows[keep]], column_of[cols[keep]]), values[keep])
    library = np.bincount(row_of[rows], weights=values, minlength=len(barcodes))
    return H5ad(counts.astype(np.float32), barcodes, genes, xy, obs, library)
