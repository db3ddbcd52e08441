"""Only root decides the policy: a policy file that anyone else could
change — itself, any directory on its path, a symlink's target — is refused,
as sshd refuses such files (StrictModes). docs/policy.md, "Who may change
the policy".

Writable by someone else means: owned by another user, or writable by a
group other than root's, or by everyone. A directory everyone may write to
is safe only with the sticky bit (as /tmp): then nobody but root can rename
or remove what root owns in it — and whatever lies below is checked too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from microseg.owners import group_name, user_name

MAX_SYMLINKS = 40


class UntrustedPath(Exception):
    """The one line to report: which path, its owner and mode, and why."""




def _why_unsafe(st: os.stat_result, is_dir: bool) -> str | None:
    mode = st.st_mode
    if st.st_uid != 0:
        return f"owned by {user_name(st.st_uid)}"
    sticky = is_dir and mode & stat.S_ISVTX
    if mode & stat.S_IWOTH and not sticky:
        return "writable by everyone"
    if mode & stat.S_IWGRP and st.st_gid != 0 and not sticky:
        return f"writable by group {group_name(st.st_gid)}"
    return None


def check_trusted(path: str | os.PathLike[str]) -> None:
    """Raise UntrustedPath unless only root can change what `path` names:
    the file, every directory on its path, every symlink's target (and its
    directories). Components that do not exist yet are not checked: their
    parent is, and decides who may create them."""
    _walk(Path(os.path.abspath(path)), 0)


def _walk(path: Path, depth: int) -> None:
    if depth > MAX_SYMLINKS:
        raise UntrustedPath(f"{path}: too many levels of symbolic links")
    current = Path(path.anchor)
    _check(current, os.lstat(current))
    for part in path.parts[1:]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            # The link lives in a checked directory; what it names is
            # checked as a path of its own.
            target = Path(os.readlink(current))
            if not target.is_absolute():
                target = current.parent / target
            rest = path.relative_to(current)
            _walk(Path(os.path.normpath(target / rest)), depth + 1)
            return
        _check(current, st)


def _check(path: Path, st: os.stat_result) -> None:
    why = _why_unsafe(st, stat.S_ISDIR(st.st_mode))
    if why:
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
        raise UntrustedPath(f"{kind} {path} is {why} (mode {stat.S_IMODE(st.st_mode):04o}, "
                            f"owner {user_name(st.st_uid)}, group {group_name(st.st_gid)})")
