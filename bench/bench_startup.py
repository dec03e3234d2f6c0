"""Startup: launching `mcp-planner serve` (stdio) to the answer of `tools/list`, against a minimal
`MCPServer` with one tool launched the same way, interleaved launches; min and median, as ratios.

    python bench/bench_startup.py [--runs 9]

Goal (SPEC section 10): <= 1.3x. Measured twice: with no downstream servers, and with the example
servers file (their processes start in the background and must not delay `tools/list`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = '''
from mcp.server.mcpserver import MCPServer

mcp = MCPServer("minimal")


@mcp.tool()
def ping(text: str) -> str:
    """Echo the text."""
    return text


if __name__ == "__main__":
    mcp.run()
'''


def planner_command(db: Path, servers: Path | None) -> list[str]:
    exe = shutil.which("mcp-planner", path=str(Path(sys.executable).parent))
    head = [exe] if exe else [sys.executable, "-m", "mcp_planner"]
    return [*head, "serve", "--db", str(db), *(["--servers", str(servers)] if servers else [])]


async def time_to_tools_list(command: list[str], env: dict[str, str], cwd: str) -> tuple[float, int]:
    params = StdioServerParameters(command=command[0], args=command[1:], env=env, cwd=cwd)
    start = time.perf_counter()
    async with Client(params, mode="legacy") as client:
        tools = await client.list_tools()
        elapsed = time.perf_counter() - start
    return elapsed, len(tools.tools)


async def main(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        minimal = tmp_path / "minimal.py"
        minimal.write_text(MINIMAL)
        env = {**os.environ, "CI_STATE_DIR": str(tmp_path / "ci"), "WORKSPACE_ROOT": str(tmp_path)}
        cases = {
            "minimal MCPServer": [sys.executable, str(minimal)],
            "mcp-planner serve": planner_command(tmp_path / "a.db", None),
            "mcp-planner serve --servers examples": planner_command(
                tmp_path / "b.db", ROOT / "examples" / "servers.json"
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        # One warm-up round (disk caches, .pyc files), then interleaved launches so drift hits all equally.
        for round_ in range(runs + 1):
            for name, command in cases.items():
                elapsed, count = await time_to_tools_list(command, env, tmp)
                assert count >= 1, f"{name} listed no tools"
                if round_:
                    times[name].append(elapsed)
        base = statistics.median(times["minimal MCPServer"])
        base_min = min(times["minimal MCPServer"])
        print(f"startup to tools/list, {runs} launches each, interleaved")
        for name, values in times.items():
            low, median = min(values), statistics.median(values)
            print(
                f"  {name:40s} min {low * 1000:7.1f} ms {low / base_min:4.2f}x   "
                f"median {median * 1000:7.1f} ms {median / base:4.2f}x"
            )
        ratio = statistics.median(times["mcp-planner serve --servers examples"]) / base
        print(f"ratio (with servers, median) {ratio:.2f}x (goal <= 1.3x): {'OK' if ratio <= 1.3 else 'OVER'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    anyio.run(main, parser.parse_args().runs)
