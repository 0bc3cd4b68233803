"""File-system rules every writer and reader of the engine follows: atomic writes, paths
that stay inside their folder, one process per run folder."""
import contextlib
import errno
import fcntl
import os
import weakref


class FileError(ValueError):
    """A file operation that failed or was refused, in one line."""


def atomic_write(path, write, mode="wb"):
    """write(f) into a temporary beside `path`, fsync, rename, fsync the folder: a crash leaves
    the old file or the new one, never half of one. A failed write (a full disk) removes the
    temporary, keeps the old file and raises FileError."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise FileError(f"could not write {path}: {e.strerror or e}; the previous file, if any, is kept") from None
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def inside(folder, relative, what):
    """folder/relative, refused unless it resolves (links followed) inside folder: a path read
    from a file must not reach anything else."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        raise FileError(f"{what} {relative!r} must be a relative path inside {folder}")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, path]) != root:
        raise FileError(f"{what} {relative!r} leads outside {folder}; paths in it must stay inside its folder")
    return path


def default_mode(path):
    """Give a file the permissions a plain open() would (0666 less the umask): some writers
    create theirs private (0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


class FolderLock:
    """An exclusive lock on a folder (`.lock` inside it, flock): a second process is refused
    with the first one's PID, or with wait=True waits its turn. Released when the process
    exits, however it exits."""

    def __init__(self, folder, what="run folder", wait=False):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, ".lock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            owner = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise FileError(f"{folder}: another process (PID {owner}) is using this {what}; wait for it to "
                                "finish or choose another --out") from None
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        self._release = weakref.finalize(self, os.close, self._fd)  # closing the file drops the lock

    def release(self):
        self._release()
