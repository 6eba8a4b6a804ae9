"""The SSD tier's directory: created private, checked before use, locked.

What kvplug keeps in ``ssd_path`` is read back as KV that a model attends
to, so the directory must be one only this user can change:

- kvplug creates it (and any missing parent) with mode 0700; an existing one
  must be a real directory (not a symbolic link), owned by this process's
  user and writable by nobody else, or start-up stops with a message naming
  the path, what is wrong and what would be accepted;
- every file of the tier (LOCK, EPOCH, the manifest and its SQLite
  companions, segment files) must be a regular file with one link, owned by
  the same user: never a symbolic link, a hard link to a file elsewhere, a
  device or a FIFO. Files are opened with O_NOFOLLOW as well, so a link
  planted while kvplug runs is an error, never a write outside the directory.

What this cannot stop: this user (or root) changing files in the directory.
kvplug's checksums catch damage, not a writer who means it; see
``integrity_key`` (kvplug/tiers/ssd.py) for that.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat

LOCK = "LOCK"
EPOCH = "EPOCH"                  # kvplug/epoch.py
MANIFEST = "manifest.sqlite3"
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")
_SEGMENT = re.compile(r"segment-[0-9]+\.kvs\Z")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class UnsafeDirectory(RuntimeError):
    """The SSD tier's directory (or a file in it) is not one kvplug may use."""


class DirectoryBusy(RuntimeError):
    """Another process (or another tier object) owns the directory."""


def _refuse(path: str, what: str, accepted: str) -> UnsafeDirectory:
    return UnsafeDirectory(f"kvplug SSD tier: {path} {what}; {accepted}")


def prepare(path: str) -> str:
    """Create ``path`` (mode 0700, missing parents too) or check the one there; its absolute path."""
    path = os.path.abspath(path)
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass  # made meanwhile: checked below like any other
    check_directory(path)
    return path


def check_directory(path: str) -> None:
    euid = os.geteuid()
    own = f"use a directory owned by uid {euid} that only it can write (chmod 0700), or a new path, which kvplug creates so"
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, f"is a symbolic link (to {os.readlink(path)!r})",
                      "give ssd_path as the real directory's path")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "is not a directory", own)
    if st.st_uid != euid:
        raise _refuse(path, f"is owned by uid {st.st_uid}, not by this process's uid {euid}", own)
    if st.st_mode & 0o022:
        who = " and ".join(w for bit, w in ((0o020, "group"), (0o002, "others")) if st.st_mode & bit)
        raise _refuse(path, f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})",
                      f"accepted: a directory only its owner can write (chmod go-w {path})")


def is_tier_file(name: str) -> bool:
    """A file the tier (or kvplug/epoch.py) opens in the directory."""
    return (name in (LOCK, EPOCH, MANIFEST) or _SEGMENT.match(name) is not None
            or any(name == MANIFEST + s for s in SQLITE_COMPANIONS))


def check_file(path: str, st: os.stat_result | None = None) -> None:
    """Refuse a tier file that is a link, not a plain file with one name, or someone else's."""
    if st is None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, f"is a symbolic link (to {os.readlink(path)!r})",
                      "kvplug opens no file of its directory through a link: remove the link")
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, "is not a regular file", "remove it; kvplug creates its files itself")
    if st.st_nlink != 1:
        raise _refuse(path, f"has {st.st_nlink} hard links",
                      "a file of the SSD tier must have one name (another would be written through): remove it")
    if st.st_uid != os.geteuid():
        raise _refuse(path, f"is owned by uid {st.st_uid}, not by this process's uid {os.geteuid()}",
                      "remove it; kvplug creates its files itself")


def check_files(path: str) -> None:
    """Check every tier file in the directory (before any of them is opened)."""
    for name in os.listdir(path):
        if is_tier_file(name):
            check_file(os.path.join(path, name))


def check_sqlite(db_path: str) -> None:
    """SQLite opens by name and follows links (its -wal and -shm beside the target): check first."""
    for suffix in ("", *SQLITE_COMPANIONS):
        check_file(db_path + suffix)


def private_sqlite(db_path: str) -> None:
    """``check_sqlite``, then make the database (created empty if missing) and its companions 0600:
    they hold token ids, and SQLite would create them 0644."""
    check_sqlite(db_path)
    try:
        os.close(open_file(db_path, os.O_RDWR | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        pass
    for suffix in ("", *SQLITE_COMPANIONS):
        try:
            fd = open_file(db_path + suffix, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def open_file(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open that never follows a link and only returns a checked regular file."""
    fd = os.open(path, flags | _NOFOLLOW, mode)
    try:
        check_file(path, os.fstat(fd))
    except UnsafeDirectory as e:
        os.close(fd)
        raise OSError(errno.EPERM, str(e)) from None
    return fd


def lock_directory(path: str) -> int:
    """flock ``path``/LOCK for the life of the returned fd (released at close or death)."""
    lock_path = os.path.join(path, LOCK)
    check_file(lock_path)
    try:
        fd = open_file(lock_path, os.O_RDWR | os.O_CREAT)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link made since the check above
            raise _refuse(lock_path, "is a symbolic link", "remove the link") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DirectoryBusy(f"kvplug SSD tier: {path} is in use by another process (pid {owner}, "
                            f"lock {lock_path}); give each process its own ssd_path") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
