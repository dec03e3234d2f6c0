"""Example downstream server: file tools confined to one directory, and a few safe "commands".

    python examples/servers/workspace.py [--root DIR]

The root is `--root`, else `$WORKSPACE_ROOT`, else `<tmp>/mcp-planner-workspace`. Every path is relative
to it; a path that resolves outside it (`..`, an absolute path, a symlink out) is refused. `run` offers an
allow-list of pure-Python commands; nothing reaches a shell.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import tempfile
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
ROOT = Path(tempfile.gettempdir(), "mcp-planner-workspace")

READ_ONLY = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)


def _resolve(path: str) -> Path:
    """The absolute path inside the root, or a ToolError saying why not."""
    root = ROOT.resolve()
    target = (root / path).resolve()
    if target != root and root not in target.parents:
        raise ToolError(f"path {path!r} is outside the workspace; use a path relative to the workspace root")
    return target


def _file(path: str) -> Path:
    target = _resolve(path)
    if not target.is_file():
        raise ToolError(f"no file {path!r} in the workspace; call list_dir to see what exists")
    return target


@mcp.tool(
    annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=False),
)
def write_file(path: str, content: str) -> dict[str, Any]:
    """Write a text file (creating parent directories), replacing any previous content."""
    target = _resolve(path)
    if target.is_dir():
        raise ToolError(f"{path!r} is a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content, encoding="utf-8")
    return {"path": path, "bytes": len(content.encode())}


@mcp.tool(structured_output=False, annotations=READ_ONLY)
def read_file(path: str) -> str:
    """Return the text of a file."""
    return _file(path).read_text(encoding="utf-8", errors="replace")


@mcp.tool(annotations=READ_ONLY)
def list_dir(path: str = ".") -> dict[str, Any]:
    """List a directory: each entry's name, type (file/dir) and size in bytes."""
    target = _resolve(path)
    if not target.is_dir():
        raise ToolError(f"no directory {path!r} in the workspace")
    entries = [
        {
            "name": p.name,
            "type": "dir" if p.is_dir() else "file",
            "size": p.stat().st_size if p.is_file() else 0,
        }
        for p in sorted(target.iterdir())
    ]
    return {"path": path, "entries": entries}


Command = Literal["count_lines", "word_count", "sha256", "head"]


@mcp.tool(annotations=READ_ONLY)
def run(command: Command, path: str, lines: int = 10) -> dict[str, Any]:
    """Run one allow-listed command on a file: count_lines, word_count, sha256, or head (first `lines`)."""
    text = _file(path).read_text(encoding="utf-8", errors="replace")
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
    global ROOT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("WORKSPACE_ROOT") or str(ROOT))
    ROOT = Path(parser.parse_args().root)
    ROOT.mkdir(parents=True, exist_ok=True)
    logging.getLogger().setLevel(logging.WARNING)
    mcp.run()


if __name__ == "__main__":
    main()
