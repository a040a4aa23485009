"""Writing files: atomically (temp file in the same folder, then ``os.replace``) and with the user's umask.

Every file the package writes for the user goes through here: PNGs, safetensors, caches, model folders. A writer
killed between writing and renaming leaves a hidden temp file; a later process's first write into that folder removes it. Two traps
this module exists for: ``tempfile.mkstemp`` creates files 0600 and ``TemporaryDirectory`` folders 0700 whatever
the umask, and ``safetensors.torch.save_file`` creates 0600 files too; either makes outputs unreadable to a ComfyUI
(or web server) running as another user. Here temp files are created with ``os.open(..., 0o666)`` so the kernel
applies the umask, exactly as a plain ``open(path, "w")`` would.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: 0o777 minus the umask."""
    return 0o777 & ~current_umask()


#: Hidden temp files are named ``.tmp-dsd-<pid>-<random>-<name>``: the writer's pid tells a killed writer's leftovers
#: (``kill -9`` between writing and renaming) from a live one's.
TEMP_PREFIX = ".tmp-dsd-"


def temp_prefix() -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-"


def _temp_name(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f"{temp_prefix()}{secrets.token_hex(6)}-{name}")


#: Folders this process has already cleaned of killed writers' temp files (a folder is listed once, not per write: a
#: data-generation folder with thousands of images would otherwise be listed again for every image).
_CLEANED: set[str] = set()


def remove_stale_temp_files(folder: str, min_age_s: float = 60.0) -> int:
    """Remove temp files left in ``folder`` by a writer that was killed before its rename: files named like
    :func:`temp_prefix` whose process no longer exists and that are older than ``min_age_s``. Returns the count."""
    import time

    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        pid = name[len(TEMP_PREFIX):].split("-", 1)[0] if name.startswith(TEMP_PREFIX) else ""
        if not pid.isdigit() or _alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        try:
            if time.time() - os.path.getmtime(path) >= min_age_s:
                os.remove(path)
                removed += 1
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to ``path``; when the block ends without error, it becomes ``path``.

    For writers that take a path (``PIL.Image.save``, ``safetensors``): the temp file is created empty with the
    umask's mode first and its mode is re-applied before the rename, so whatever the writer does, ``path`` ends up
    with the mode a plain ``open(path, "w")`` gives. On error the temp file is removed and ``path`` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if folder not in _CLEANED:
        remove_stale_temp_files(folder)
        _CLEANED.add(folder)
    tmp = _temp_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", encoding: str | None = None):
    """``open(path, mode)`` that writes to a temp file and renames it into place when the block succeeds."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes new files; mode {mode!r} is not a write mode")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f


def write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, atomically and with the umask's mode (save_file itself makes 0600 files)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def apply_umask(folder: str) -> None:
    """Give ``folder`` and everything in it the modes the umask gives new files and folders.

    For trees written by libraries that create 0600 files or 0700 temp folders (diffusers' ``save_pretrained`` via
    safetensors, ``tempfile.TemporaryDirectory``), before the tree is moved into place.
    """
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(folder, dmode)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                keep_exec = os.stat(p).st_mode & stat.S_IXUSR
                os.chmod(p, dmode if keep_exec else fmode)
