"""Tokens through an agent's context: calling the tools itself vs handing the workflow to the planner.

    python bench/bench_tokens.py [--sizes 500,1000,2000,4000,20000]

The reference workflow (issue 15): read 10 files, transform each (its title and word count), write 10
results: 20 downstream calls, against the example workspace server (a real stdio process) in a fresh
directory, once per file size.

- (a) direct: the agent sees the workspace's tool definitions (name, description, input schema), writes each
  call's arguments and reads each result's text.
- (b) planner: the agent reads `list_tools(query)`'s text, writes one plan (`create_plan`'s arguments: a
  `for_each` read, a `for_each` write rendering each summary, one output), reads `create_plan`'s answer and
  `execute_plan`'s answer. Both run through the real planner MCP server (`mcp.Client`, in process).
  b+ adds the planner's own tool definitions (`tools/list`), which an agent pays once per conversation.

Tokens are counted as characters / 4 (no tokenizer works offline here): the ratio b/a is what matters,
and it holds for any tokenizer whose tokens per character are the same on both sides. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp_types import CallToolResult, TextContent

from mcp_planner.downstream.client import Downstream
from mcp_planner.downstream.config import ServersConfig
from mcp_planner.server.app import build_server
from mcp_planner.service import PlannerService
from mcp_planner.store.sqlite import PlanStore

WORKSPACE = Path(__file__).resolve().parent.parent / "examples" / "servers" / "workspace.py"
FILES = 10
WORDS = "the planner runs the whole workflow and only the answer comes back to the agent".split()


def tokens(text: str) -> int:
    return (len(text) + 3) // 4


def result_text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def note(i: int, size: int) -> str:
    body = []
    while sum(len(w) + 1 for w in body) < size:
        body.append(WORDS[(len(body) * 7 + i) % len(WORDS)])
    return f"Note {i}: about planning\n" + " ".join(body) + "\n"


def summary(name: str, text: str) -> str:
    """The transform: a file's title line and its word count."""
    return f"{name}: {text.splitlines()[0]} ({len(text.split())} words)"


def the_plan(names: list[str]) -> dict[str, Any]:
    return {
        "description": "summarise 10 notes: title and word count of each, written to out/",
        "steps": [
            {
                "id": "read",
                "tool_name": "workspace.read_file",
                "for_each": names,
                "parameters": {"path": "notes/{{ item }}"},
            },
            {
                "id": "write",
                "tool_name": "workspace.write_file",
                "for_each": names,
                "parameters": {
                    "path": "out/{{ item }}",
                    "content": "{{ item }}: {{ steps.read.result[item_index].splitlines()[0] }} "
                    "({{ steps.read.result[item_index].split() | length }} words)",
                },
            },
        ],
        "outputs": {"written": "{{ steps.write.result | length }} summaries written to out/"},
        "options": {"require_approval": False, "allow_parallel": True, "max_parallel_steps": 5},
    }


async def direct(root: Path, names: list[str]) -> dict[str, int]:
    params = StdioServerParameters(command=sys.executable, args=[str(WORKSPACE), "--root", str(root)])
    counts = {"definitions": 0, "arguments": 0, "results": 0}
    async with Client(params, mode="legacy", cache=None) as client:
        for tool in (await client.list_tools()).tools:
            seen = {"name": tool.name, "description": tool.description, "input_schema": tool.input_schema}
            counts["definitions"] += tokens(json.dumps(seen))
        for name in names:
            arguments = {"path": f"notes/{name}"}
            read = await client.call_tool("read_file", arguments)
            text = result_text(read)
            counts["arguments"] += tokens(json.dumps(arguments))
            counts["results"] += tokens(text)
            arguments = {"path": f"direct/{name}", "content": summary(name, text)}
            written = await client.call_tool("write_file", arguments)
            counts["arguments"] += tokens(json.dumps(arguments))
            counts["results"] += tokens(result_text(written))
    return counts


async def planner(root: Path, names: list[str], db: Path) -> tuple[dict[str, int], str]:
    config = ServersConfig.from_dict(
        {
            "mcpServers": {
                "workspace": {"command": sys.executable, "args": [str(WORKSPACE), "--root", str(root)]}
            }
        }
    )
    counts = {"list_tools": 0, "plan": 0, "answers": 0, "planner definitions": 0}
    async with (
        Downstream(config) as downstream,
        PlanStore.open(db) as store,
        PlannerService(store, downstream) as service,
        Client(build_server(service)) as client,
    ):
        for tool in (await client.list_tools()).tools:
            seen = {"name": tool.name, "description": tool.description, "input_schema": tool.input_schema}
            counts["planner definitions"] += tokens(json.dumps(seen))
        found = await client.call_tool("list_tools", {"query": "read write file", "limit": 5})
        counts["list_tools"] = tokens(result_text(found))
        plan = the_plan(names)
        counts["plan"] = tokens(json.dumps(plan))
        created = await client.call_tool("create_plan", plan)
        counts["answers"] += tokens(result_text(created))
        plan_id = (created.structured_content or {})["id"]
        executed = await client.call_tool("execute_plan", {"plan_id": plan_id})
        answer = result_text(executed)
        counts["answers"] += tokens(answer)
        if os.environ.get("SHOW"):
            print(result_text(found), result_text(created), answer, sep="\n----\n")
    return counts, answer


async def measure(size: int) -> None:
    names = [f"note-{i}.md" for i in range(FILES)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "workspace"
        (root / "notes").mkdir(parents=True)
        for i, name in enumerate(names):
            (root / "notes" / name).write_text(note(i, size))
        a = await direct(root, names)
        b, answer = await planner(root, names, Path(tmp) / "plans.db")
        for name in names:  # both did the same work
            assert (root / "out" / name).read_text() == (root / "direct" / name).read_text(), name
    total_a = sum(a.values())
    total_b = b["list_tools"] + b["plan"] + b["answers"]
    total_b_defs = total_b + b["planner definitions"]
    print(f"\nfiles of ~{size} characters ({FILES} read, {FILES} written)")
    print(f"  (a) direct   {total_a:7} tokens  " + ", ".join(f"{k} {v}" for k, v in a.items()))
    print(
        f"  (b) planner  {total_b:7} tokens  "
        + ", ".join(f"{k} {v}" for k, v in b.items() if "defin" not in k)
    )
    print(f"      planner's own tool definitions {b['planner definitions']} (once per conversation)")
    print(
        f"  RATIO b/a  {total_b / total_a:.3f}  (goal <= 0.2)   b+/a (with the planner's definitions) "
        f"{total_b_defs / total_a:.3f}"
    )
    print("  the answer the agent reads starts: " + json.dumps(answer.splitlines()[:2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,1000,2000,4000,20000")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print("tokens through the agent's context (characters / 4)")
    for size in (int(s) for s in args.sizes.split(",")):
        anyio.run(measure, size)


if __name__ == "__main__":
    main()
