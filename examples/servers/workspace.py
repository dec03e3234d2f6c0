"""Example downstream server: file tools confined to one directory, and a few safe "commands".

    python examples/servers/workspace.py [--root DIR]

The root is `--root`, else `$WORKSPACE_ROOT`, else `<tmp>/mcp-planner-workspace-<uid>` (one per user).
Every path is relative to it. `..`, absolute paths, symbolic links anywhere in a path, and files with more
than one hard link are refused. `run` offers an allow-list of pure-Python commands; nothing reaches a
shell. POSIX only.

Why it is written this way (copy it if you write a server like this): checking a resolved path and then
opening it is a race, since anyone who can write inside the root can swap a directory for a symlink between
the check and the use, and a hard link inside the root to a file outside looks like an ordinary file. So
every operation walks from a descriptor of the root, one component at a time, with `O_NOFOLLOW`, and checks
the descriptor it opened (`fstat`), never the path.
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations

mcp = MCPServer(
    "workspace",
    instructions="Files in one workspace directory. Paths are relative to the workspace root.",
    log_level="WARNING",
)
# Per user: a root another user created first is not ours to write in.
ROOT = Path(tempfile.gettempdir(), f"mcp-planner-workspace-{os.getuid()}")
#: The root, opened once at start-up: renaming or replacing the root's path later does not move the server.
ROOT_FD = -1

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not hang the server; fstat then refuses it as not a regular file.
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

READ_ONLY = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)


def _parts(path: str) -> list[str]:
    """The path's components, or a ToolError for a path that could leave the root."""
    if path.startswith("/") or "\0" in path:
        raise ToolError(f"path {path!r} is not relative; use a path relative to the workspace root")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ToolError(f"path {path!r} contains '..'; use a path inside the workspace root")
    return parts


@contextmanager
def _refusing(path: str) -> Iterator[None]:
    """Turn the OS errors of one operation on `path` into ToolErrors that say what to do."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            message = f"{path!r} goes through a symbolic link, which the workspace refuses; use the real path"
        elif exc.errno == errno.ENOENT:
            message = f"nothing at {path!r} in the workspace; call list_dir to see what exists"
        elif exc.errno == errno.ENOTDIR:
            message = f"a parent of {path!r} is not a directory; call list_dir to see what exists"
        elif exc.errno == errno.EISDIR:
            message = f"{path!r} is a directory; name a file"
        else:
            message = f"cannot use {path!r}: {exc.strerror}"
        raise ToolError(message) from exc


@contextmanager
def _directory(parts: list[str], *, create: bool = False) -> Iterator[int]:
    """A descriptor of the directory `parts` below the root, opened one component at a time."""
    fd = os.dup(ROOT_FD)
    try:
        for depth, name in enumerate(parts, 1):
            try:
                child = _subdirectory(fd, name, create)
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                where = "/".join(parts[:depth])
                if _is_symlink(fd, name):
                    raise ToolError(
                        f"{where!r} is a symbolic link, which the workspace refuses; use the real path"
                    ) from exc
                raise ToolError(f"{where!r} is not a directory; call list_dir to see what exists") from exc
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _subdirectory(fd: int, name: str, create: bool) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
    # mkdir never follows a symlink at `name` (EEXIST); the open below then refuses it.
    try:
        os.mkdir(name, dir_fd=fd)
    except FileExistsError:
        pass
    return os.open(name, _DIR_FLAGS, dir_fd=fd)


def _is_symlink(fd: int, name: str) -> bool:
    """Only to word an error message: the refusal itself came from O_NOFOLLOW."""
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode)
    except OSError:
        return False


def _open_file(path: str, flags: int) -> int:
    """A descriptor of the regular, singly-linked file at `path`; `O_CREAT` in `flags` creates it (and its
    parent directories)."""
    parts = _parts(path)
    if not parts:
        raise ToolError("the path names the workspace root; name a file in it")
    *parents, name = parts
    with _directory(parents, create=bool(flags & os.O_CREAT)) as parent:
        fd = os.open(name, flags | _FILE_FLAGS, 0o666, dir_fd=parent)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ToolError(f"{path!r} is not a regular file; name a file")
        if info.st_nlink > 1:  # another link may sit outside the root
            raise ToolError(
                f"{path!r} has {info.st_nlink} hard links, which the workspace refuses; copy the file instead"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(path: str) -> str:
    with _refusing(path):
        fd = _open_file(path, os.O_RDONLY)
        with os.fdopen(fd, encoding="utf-8", errors="replace") as file:
            return file.read()


@mcp.tool(
    annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=False),
)
def write_file(path: str, content: str) -> dict[str, Any]:
    """Write a text file (creating parent directories), replacing any previous content."""
    with _refusing(path):
        # No O_TRUNC: a file is emptied only after its descriptor passed the checks.
        fd = _open_file(path, os.O_WRONLY | os.O_CREAT)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.truncate(0)
            file.write(content)
    return {"path": path, "bytes": len(content.encode())}


@mcp.tool(structured_output=False, annotations=READ_ONLY)
def read_file(path: str) -> str:
    """Return the text of a file."""
    return _read(path)


#: The longest `pattern` list_dir takes: a glob is a filter on names, never a path.
MAX_PATTERN = 200


@mcp.tool(annotations=READ_ONLY)
def list_dir(path: str = ".", pattern: str | None = None) -> dict[str, Any]:
    """List a directory: each entry's name, type (file/dir/symlink/other) and size in bytes (files only),
    and `files`, the names of its regular files. `pattern` (a glob such as `*.md`, matched against names,
    case-sensitive) keeps only the entries it matches."""
    if pattern is not None and (len(pattern) > MAX_PATTERN or "/" in pattern or "\0" in pattern):
        raise ToolError(
            f"pattern {pattern[:50]!r} is not a name pattern: use a glob of at most {MAX_PATTERN} characters "
            "without '/', e.g. '*.md'; list_dir(path=...) names the directory"
        )
    entries = []
    with _refusing(path), _directory(_parts(path)) as fd:
        for entry in sorted(os.scandir(fd), key=lambda e: e.name):
            if pattern is not None and not fnmatch.fnmatchcase(entry.name, pattern):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed since the listing was read
                continue
            if stat.S_ISLNK(info.st_mode):
                kind = "symlink"
            elif stat.S_ISDIR(info.st_mode):
                kind = "dir"
            elif stat.S_ISREG(info.st_mode):
                kind = "file"
            else:
                kind = "other"
            entries.append({"name": entry.name, "type": kind, "size": info.st_size if kind == "file" else 0})
    files = [e["name"] for e in entries if e["type"] == "file"]
    return {"path": path, "entries": entries, "files": files}


Command = Literal["count_lines", "word_count", "sha256", "head"]


@mcp.tool(annotations=READ_ONLY)
def run(command: Command, path: str, lines: int = 10) -> dict[str, Any]:
    """Run one allow-listed command on a file: count_lines, word_count, sha256, or head (first `lines`)."""
    text = _read(path)
    output: Any
    if command == "count_lines":
        output = len(text.splitlines())
    elif command == "word_count":
        output = len(text.split())
    elif command == "sha256":
        output = hashlib.sha256(text.encode()).hexdigest()
    else:
        output = "\n".join(text.splitlines()[: max(0, lines)])
    return {"command": command, "path": path, "output": output}


def main() -> None:
    global ROOT, ROOT_FD
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("WORKSPACE_ROOT") or str(ROOT))
    ROOT = Path(parser.parse_args().root)
    ROOT.mkdir(parents=True, exist_ok=True)
    ROOT_FD = os.open(ROOT, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    logging.getLogger().setLevel(logging.WARNING)
    mcp.run()


if __name__ == "__main__":
    main()
