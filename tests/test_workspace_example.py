"""The example `workspace` server (examples/servers/workspace.py) as a real stdio process: ordinary file work
inside its root, and every way out of the root refused (`..`, absolute paths, symlinks, hard links, and a
directory swapped for a symlink while writes run)."""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp_types import CallToolResult, TextContent

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "servers" / "workspace.py"
SECRET = "the secret 4711"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    (tmp_path / "outside").mkdir()
    return tmp_path / "outside"


@asynccontextmanager
async def workspace(root: Path) -> AsyncIterator[Client]:
    params = StdioServerParameters(command=sys.executable, args=[str(SCRIPT), "--root", str(root)])
    with anyio.fail_after(30):  # start-up on a busy machine, and the whole test after it
        async with Client(params, mode="legacy") as client:
            yield client


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def files_under(root: Path) -> dict[str, str]:
    """Each regular file below `root` (symlinks not followed): name -> text."""
    return {name: Path(d, name).read_text() for d, _, files in os.walk(root) for name in files}


def text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


async def call(client: Client, tool: str, **arguments: Any) -> CallToolResult:
    return await client.call_tool(tool, arguments)


async def refused(client: Client, tool: str, **arguments: Any) -> str:
    result = await call(client, tool, **arguments)
    assert result.is_error, f"{tool}({arguments}) was not refused: {text(result)}"
    assert SECRET not in text(result)
    return text(result)


async def test_files_are_written_read_listed_and_run_inside_the_root(root: Path) -> None:
    async with workspace(root) as client:
        written = await call(client, "write_file", path="notes/2024/todo.md", content="one\ntwo\nthree\n")
        assert not written.is_error, text(written)
        assert (root / "notes" / "2024" / "todo.md").read_text() == "one\ntwo\nthree\n"

        shorter = await call(client, "write_file", path="./notes//2024/todo.md", content="only\n")
        assert not shorter.is_error, text(shorter)
        assert text(await call(client, "read_file", path="notes/2024/todo.md")) == "only\n"

        (root / "notes" / "2024" / "done.md").write_text("a b c")
        listing = await call(client, "list_dir", path="notes/2024")
        assert listing.structured_content == {
            "path": "notes/2024",
            "entries": [
                {"name": "done.md", "type": "file", "size": 5},
                {"name": "todo.md", "type": "file", "size": 5},
            ],
            "files": ["done.md", "todo.md"],
        }
        top = await call(client, "list_dir")
        assert top.structured_content is not None
        assert top.structured_content["entries"] == [{"name": "notes", "type": "dir", "size": 0}]

        count = await call(client, "run", command="word_count", path="notes/2024/done.md")
        assert count.structured_content is not None and count.structured_content["output"] == 3


async def test_list_dir_keeps_the_entries_a_glob_pattern_matches(root: Path) -> None:
    (root / "notes" / "old.md").parent.mkdir()
    for name in ("a.md", "b.MD", "c.txt", "old.md"):
        (root / "notes" / name).write_text(name)
    (root / "notes" / "x.md").mkdir()  # a directory matching the pattern is an entry, but not in `files`
    async with workspace(root) as client:
        listing = await call(client, "list_dir", path="notes", pattern="*.md")
        assert listing.structured_content is not None
        assert [e["name"] for e in listing.structured_content["entries"]] == ["a.md", "old.md", "x.md"]
        assert listing.structured_content["files"] == ["a.md", "old.md"]  # case-sensitive: not b.MD

        either = await call(client, "list_dir", path="notes", pattern="[ab].*")
        assert either.structured_content is not None
        assert either.structured_content["files"] == ["a.md", "b.MD"]
        none = await call(client, "list_dir", path="notes", pattern="*.pdf")
        assert none.structured_content == {"path": "notes", "entries": [], "files": []}

        assert "not a name pattern" in await refused(client, "list_dir", path=".", pattern="notes/*.md")
        assert "not a name pattern" in await refused(client, "list_dir", pattern="*" * 201)


async def test_a_hard_link_to_a_file_outside_is_refused_for_read_write_and_run(
    root: Path, outside: Path
) -> None:
    secret = outside / "secret.txt"
    secret.write_text(SECRET)
    os.link(secret, root / "linked.txt")
    async with workspace(root) as client:
        assert "hard links" in await refused(client, "read_file", path="linked.txt")
        assert "hard links" in await refused(client, "write_file", path="linked.txt", content="overwritten")
        await refused(client, "run", command="head", path="linked.txt")
    assert secret.read_text() == SECRET


async def test_symlinks_to_a_file_or_a_directory_are_refused(root: Path, outside: Path) -> None:
    secret = outside / "secret.txt"
    secret.write_text(SECRET)
    (root / "file_link").symlink_to(secret)
    (root / "dir_link").symlink_to(outside)
    (root / "dangling").symlink_to(outside / "created.txt")
    async with workspace(root) as client:
        assert "symbolic link" in await refused(client, "read_file", path="file_link")
        await refused(client, "write_file", path="file_link", content="overwritten")
        await refused(client, "write_file", path="dangling", content="escaped")
        for tool, arguments in [
            ("read_file", {"path": "dir_link/secret.txt"}),
            ("write_file", {"path": "dir_link/new.txt", "content": "escaped"}),
            ("write_file", {"path": "dir_link/deeper/new.txt", "content": "escaped"}),
            ("list_dir", {"path": "dir_link"}),
        ]:
            message = await refused(client, tool, **arguments)
            assert "'dir_link' is a symbolic link" in message
        listing = await call(client, "list_dir")
        assert listing.structured_content is not None
        assert {e["name"]: e["type"] for e in listing.structured_content["entries"]} == {
            "dangling": "symlink",
            "dir_link": "symlink",
            "file_link": "symlink",
        }
    assert secret.read_text() == SECRET
    assert names(outside) == ["secret.txt"]


async def test_parent_and_absolute_paths_are_refused(root: Path, outside: Path) -> None:
    secret = outside / "secret.txt"
    secret.write_text(SECRET)
    (root / "sub").mkdir()
    async with workspace(root) as client:
        for path in ("../outside/secret.txt", "sub/../../outside/secret.txt", str(secret)):
            await refused(client, "read_file", path=path)
            await refused(client, "write_file", path=path, content="overwritten")
        assert "'..'" in await refused(client, "list_dir", path="..")
        await refused(client, "write_file", path="../outside/new.txt", content="escaped")
    assert secret.read_text() == SECRET
    assert names(outside) == ["secret.txt"]


async def test_a_fifo_or_a_directory_named_as_a_file_is_refused_without_blocking(root: Path) -> None:
    os.mkfifo(root / "pipe")
    (root / "folder").mkdir()
    async with workspace(root) as client:
        assert "not a regular file" in await refused(client, "read_file", path="pipe")
        await refused(client, "write_file", path="pipe", content="into the pipe")
        await refused(client, "read_file", path="folder")
        assert "is a directory" in await refused(client, "write_file", path="folder", content="x")
        assert "name a file" in await refused(client, "read_file", path=".")


def swap_with_symlink(root: Path, outside: Path, stop: threading.Event) -> int:
    """Until `stop`: move the directory `root/sub` aside, rename a symlink to `outside` into its place, then
    put them back, each state held about as long as the other. Returns how many times the symlink was in
    place. A step fails when a write recreated a missing `sub` in between; the loop goes on (that `sub` is
    moved aside next time round)."""
    sub, link = str(root / "sub"), str(root / "link")
    os.symlink(outside, link, target_is_directory=True)
    swaps = 0
    for i in itertools.count():
        if stop.is_set():
            break
        aside = str(root / f"aside-{i}")
        with suppress(OSError):
            os.rename(sub, aside)
        try:
            os.rename(link, sub)
        except OSError:
            pass
        else:
            swaps += 1
            os.rename(sub, link)
        with suppress(OSError):
            os.rename(aside, sub)
    return swaps


async def test_a_directory_swapped_for_a_symlink_during_writes_never_lets_a_write_out(
    root: Path, outside: Path
) -> None:
    (root / "sub").mkdir()
    stop = threading.Event()
    written: dict[str, str] = {}
    swaps = 0

    async def swapper() -> None:
        nonlocal swaps
        swaps = await anyio.to_thread.run_sync(swap_with_symlink, root, outside, stop)

    async with workspace(root) as client, anyio.create_task_group() as tg:
        tg.start_soon(swapper)
        try:
            for i in range(300):
                content = f"write {i}"
                result = await call(client, "write_file", path=f"sub/f{i}.txt", content=content)
                if not result.is_error:
                    written[f"f{i}.txt"] = content
        finally:
            stop.set()
    assert swaps > 0 and written  # the race was on, and writes went through between swaps
    assert names(outside) == []
    # Every write reported as done landed inside the root (in `sub` or a directory moved aside).
    assert written.items() <= files_under(root).items()
