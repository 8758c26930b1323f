"""The output folder: built in a temporary folder beside OUT and renamed into place at the end."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

from ..errors import OmnimergeError
from .sources import confined_files

# Files of a model folder that describe the model but hold no weights: copied from the skeleton.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_SKIP = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md", "omnimerge.yaml",
         "report.json", "adapter_config.json", ".gitattributes"}
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                      "*.model", "*.tiktoken", "chat_template*")


def shard_filenames(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def is_tokenizer_file(name: str) -> bool:
    return any(Path(name).match(p) for p in TOKENIZER_PATTERNS)


def describing_files(folder: Path) -> list[Path]:
    """The non-weight files of a model folder, each checked to lie inside it (a link that leaves the
    folder would copy a file of the user's, e.g. a key, into the output)."""
    files = [p for p in sorted(folder.iterdir())
             if p.is_file() and p.name not in _SKIP and p.suffix not in _WEIGHT_SUFFIXES and not p.name.startswith(".")]
    return confined_files(folder, files, "a file to copy into the output")


def model_files(skeleton: Path, tokenizer_source: Path) -> dict[str, Path]:
    """Every non-weight file to copy: config, processor, template, generation config, and the
    tokenizer files (from ``tokenizer_source`` when it is not the skeleton)."""
    own_tokenizer = tokenizer_source == skeleton
    files = {p.name: p for p in describing_files(skeleton) if own_tokenizer or not is_tokenizer_file(p.name)}
    if not own_tokenizer:
        files |= {p.name: p for p in describing_files(tokenizer_source) if is_tokenizer_file(p.name)}
    return files


def human_size(n: float) -> str:
    """A byte count in the unit that fits, three significant digits: 512 B, 48 kB, 492 kB, 3.21 MB, 1.5 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# --- what --force may replace --------------------------------------------------------------------
def _written_by_omnimerge(folder: Path) -> bool:
    """``folder`` holds an omnimerge.yaml (a recipe) or a report.json that omnimerge wrote."""
    report = folder / "report.json"
    if report.is_file() and not report.is_symlink():
        try:
            data = json.loads(report.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "omnimerge_version" in data:
                return True
        except (OSError, ValueError):
            pass
    recipe = folder / "omnimerge.yaml"
    if recipe.is_file() and not recipe.is_symlink():
        try:
            import yaml

            data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
            return isinstance(data, dict) and "method" in data and "models" in data
        except (OSError, ValueError, yaml.YAMLError):
            pass
    return False


def foreign_file(folder: Path) -> str | None:
    """A file in ``folder`` that ``--force`` must not delete, or None when ``folder`` may be replaced:
    it is empty, or omnimerge wrote it (see ``_written_by_omnimerge``), or it holds only such folders
    (the outputs of a ``skeletons:`` recipe)."""
    entries = sorted(folder.iterdir())
    if not entries or _written_by_omnimerge(folder):
        return None
    for e in entries:
        if e.is_symlink() or not e.is_dir():
            return e.name
        if _written_by_omnimerge(e):
            continue
        inner = foreign_file(e)
        if inner is not None or not any(e.iterdir()):
            return f"{e.name}/{inner}" if inner else f"{e.name}/"
    return None


# --- one run per output -------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _this_run() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def run_alive(owner: dict) -> bool | None:
    """Whether the run described by ``owner`` (pid, host, start) still runs; None when it ran on another
    host (it cannot be checked from here)."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = owner.get("start")
    return start is None or _process_start(pid) in (None, start)


def _describe(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('since', '?')}"


class OutputLock:
    """An exclusive lock on an output path for a whole run: ``.<name>.omnimerge-lock`` beside it, locked
    with ``flock`` (released by the kernel when the process ends, however it ends) and holding the
    run's pid and host. A second run fails at once, naming the first."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.omnimerge-lock"
        self.fd: int | None = None
        self.previous: dict = {}  # what the file said when we took it: the last run, which died

    def owner(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def busy_error(self, owner: dict) -> OmnimergeError:
        return OmnimergeError(f"output {self.out} is being written by another omnimerge run ({_describe(owner)}); "
                              "wait for it to finish, or choose another output folder")

    def probe(self) -> None:
        """Fail fast when a live run holds the lock (without taking it)."""
        owner = self.owner() if self.path.exists() else {}
        if owner and run_alive(owner) is not False and self._held_by_other():
            raise self.busy_error(owner)

    def _held_by_other(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock is refused only while a run holds it
            return False
        except BlockingIOError:
            return True
        except OSError:  # no flock on this file system: trust the pid
            return True
        finally:
            os.close(fd)

    def acquire(self) -> None:
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self.busy_error(self.owner()) from None
            except OSError:  # no flock on this file system (some network mounts): the pid decides
                owner = self.owner()
                if owner and run_alive(owner) is not False and owner.get("pid") != os.getpid():
                    os.close(fd)
                    raise self.busy_error(owner) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:  # not a file the previous holder unlinked while we waited for it
                break
            os.close(fd)
        else:
            raise OmnimergeError(f"cannot lock {self.path}: it keeps being replaced; is another program removing it?")
        self.fd = fd
        try:
            old = os.pread(fd, 1 << 16, 0)
            self.previous = json.loads(old) if old else {}
        except ValueError:
            self.previous = {}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_this_run()).encode(), 0)

    def note_tmp(self, tmp: Path) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(_this_run() | {"tmp": tmp.name}).encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                os.unlink(self.path)  # while still locked: a run that opened it retries on the new file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _stale_entries(out: Path) -> list[Path]:
    prefixes = (f".{out.name}.omnimerge-tmp-", f".{out.name}.omnimerge-old-")
    try:
        return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefixes))
    except OSError:
        return []


# --- the output folder --------------------------------------------------------------------------
_RENAME_NOREPLACE = 1


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists — atomically where the
    kernel offers renameat2(RENAME_NOREPLACE) (Linux), else by checking just before."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            renameat2 = libc.renameat2
        except (OSError, AttributeError):
            renameat2 = None
        if renameat2 is not None:
            at_fdcwd = -100
            if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
                return
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                raise FileExistsError(errno.EEXIST, "exists", str(dst))
            if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


class OutputFolder:
    """``with OutputFolder(out, force) as tmp: ...`` writes into ``tmp``; ``commit()`` moves it to ``out``.

    Guarantees: an existing OUT is replaced only with ``force`` and only if it is empty or an
    omnimerge output (``foreign_file``); one run at a time per OUT (``OutputLock``, held from
    ``__enter__`` to ``__exit__``); temporary folders of runs that died are removed by the next run;
    the final rename never replaces a folder that appeared at OUT during the run."""

    def __init__(self, out: str | Path, force: bool, protect: list[Path] = ()):
        self.out = Path(out).absolute()
        self.force = force
        self.protect = list(protect)
        self.tmp: Path | None = None
        self.notes: list[str] = []
        self._committed = False
        self._lock = OutputLock(self.out)
        self._check(self.protect)
        self._lock.probe()

    def _check(self, protect) -> None:
        out = self.out
        real_out = Path(os.path.realpath(out))
        for p in protect:
            p = Path(p).resolve()
            if real_out == p or real_out in p.parents:
                raise OmnimergeError(f"output {out} is, or contains, the input {p}; choose another output folder")
            if p in real_out.parents:
                raise OmnimergeError(f"output {out} is inside the input folder {p}; choose an output folder outside "
                                     "every input folder")
        if os.path.islink(out):
            raise OmnimergeError(f"output {out} is a link (to {os.path.realpath(out)}); give a real folder path")
        if out.exists():
            if not out.is_dir():
                raise OmnimergeError(f"output {out} exists and is a file; choose a folder name")
            if any(out.iterdir()):
                foreign = foreign_file(out)
                if foreign is not None:
                    raise OmnimergeError(
                        f"output {out} exists and holds files omnimerge did not write (e.g. {foreign}); --force "
                        "replaces only an empty folder or an omnimerge output"
                        + (f", and would have deleted {out / foreign}" if self.force else "")
                        + ". Choose another output folder, or move those files away")
                if not self.force:
                    raise OmnimergeError(f"output {out} exists (an earlier omnimerge output); pass --force to "
                                         "replace it")
        parent = out.parent
        if not parent.is_dir():
            raise OmnimergeError(f"cannot write {out}: its parent folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise OmnimergeError(f"cannot write {out}: no write permission in {parent}")

    def check_space(self, nbytes: int) -> None:
        free = shutil.disk_usage(self.out.parent).free
        need = int(nbytes * 1.01) + (16 << 20)
        if free < need:
            raise OmnimergeError(
                f"not enough disk space for {self.out}: the merge writes about {human_size(nbytes)} (and needs "
                f"{human_size(need)} free), {human_size(free)} are free on that disk; free some space or choose "
                "another output folder"
            )

    def _say(self, note: str) -> None:
        self.notes.append(note)
        print(f"note: {note}", file=sys.stderr, flush=True)

    def _remove_stale(self) -> None:
        """Remove what interrupted runs left beside OUT (this run holds the lock: no live run owns them)."""
        prev = self._lock.previous
        for p in _stale_entries(self.out):
            who = (f"pid {prev.get('pid')} on {prev.get('host')}" if prev.get("tmp") == p.name or
                   (prev and ".omnimerge-old-" in p.name) else "an earlier run")
            if prev.get("tmp") == p.name and run_alive(prev) is True:  # no flock here, and that run lives
                continue
            remove_tree(p)
            if not os.path.lexists(p):
                self._say(f"removed {p}, left by an interrupted omnimerge run ({who})")

    def __enter__(self) -> Path:
        self._lock.acquire()
        try:
            self._remove_stale()
            self._check(self.protect)  # again, now that no other run can change OUT
            self.tmp = self.out.parent / f".{self.out.name}.omnimerge-tmp-{uuid.uuid4().hex[:8]}"
            self._lock.note_tmp(self.tmp)
            self.tmp.mkdir()
        except BaseException:
            self._lock.release()
            raise
        return self.tmp

    def _appeared(self, what: str) -> OmnimergeError:
        return OmnimergeError(f"output {self.out} {what} while this run was writing; it was left as it is and this "
                              "run's result was discarded. Choose another output folder, or run again")

    def commit(self) -> None:
        old = None
        if os.path.lexists(self.out):
            if os.path.islink(self.out) or not self.out.is_dir():
                raise self._appeared("appeared")
            if not any(self.out.iterdir()):
                try:
                    os.rmdir(self.out)  # an empty folder holds nothing to lose; fails if a file arrives meanwhile
                except OSError:
                    raise self._appeared("changed") from None
            elif self.force and foreign_file(self.out) is None:
                old = self.out.parent / f".{self.out.name}.omnimerge-old-{uuid.uuid4().hex[:8]}"
                os.rename(self.out, old)
            else:
                raise self._appeared("appeared" if not self.force else "changed")
        try:
            rename_no_replace(self.tmp, self.out)
        except BaseException as e:
            if old is not None and not os.path.lexists(self.out):
                os.rename(old, self.out)  # put the earlier output back
            if isinstance(e, FileExistsError):
                raise self._appeared("appeared") from None
            raise
        self._committed = True
        if old is not None:
            remove_tree(old)

    def __exit__(self, *exc) -> None:
        try:
            if not self._committed and self.tmp is not None:
                remove_tree(self.tmp)
        finally:
            self._lock.release()


def remove_tree(path: Path, tries: int = 20) -> None:
    """Remove a folder even while another process is still finishing a file in it: a file created
    during a removal makes the last rmdir fail, so the removal is repeated until the folder is gone."""
    for _ in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
        time.sleep(0.05)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
