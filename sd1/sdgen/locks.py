"""Exclusive locks on files that several processes may write at once (an image folder's manifest, a search's run
directory): `fcntl.flock` on a lock file that holds the holder's PID. The kernel drops a lock when its process
ends, however it ends, so the lock file of a dead process is simply taken over."""
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional


class LockHeld(RuntimeError):
    """Another live process holds the lock (`pid`: the one written in the lock file, None if unreadable)."""

    def __init__(self, path: Path, pid: Optional[int]):
        super().__init__(f"{path} is locked by PID {pid if pid is not None else '?'}")
        self.path, self.pid = path, pid


def _holder(fd: int) -> Optional[int]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


@contextmanager
def exclusive_lock(path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created, this process's PID written in it) for the block; it
    is removed at the end. wait False: raise LockHeld at once when another process holds it."""
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockHeld(path, holder) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed that file as we waited for it: lock the one there now
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock is released, so that no waiter holds a removed file
        os.close(fd)
