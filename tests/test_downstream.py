"""Downstream servers through real subprocesses: start-up, failures, timeouts, content, concurrency."""

from __future__ import annotations

import base64
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from test_shutdown import alive  # a zombie not yet reaped has died

from mcp_planner.downstream.client import BACKOFF_CAP, Downstream, backoff_delay, to_step_result
from mcp_planner.downstream.config import ServersConfig
from mcp_planner.engine.tools import ToolProvider
from mcp_planner.errors import DownstreamError, StepError, StepTimeoutError, ToolCallError, ToolNotFoundError
from mcp_planner.plan.model import RESULT_PREVIEW_LIMIT

pytestmark = pytest.mark.anyio

SERVERS = Path(__file__).parent / "servers"
READY = 30  # seconds; a Python MCP server takes a second or two to import on a busy machine


def stdio(script: str, **extra: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [str(SERVERS / script)], **extra}


def servers(**entries: dict[str, Any]) -> ServersConfig:
    return ServersConfig.from_dict({"mcpServers": entries}, {})


def recorded_pids(directory: Path) -> list[int]:
    return [int(p.read_text()) for p in directory.glob("*.pid")]


async def test_servers_start_concurrently_in_the_background_and_one_failing_does_not_stop_the_others(
    tmp_path: Path,
) -> None:
    # Each `basic` server waits at start-up until both have started: started one after the other, the
    # first would never get past that point.
    rendezvous = {"RENDEZVOUS_DIR": str(tmp_path), "RENDEZVOUS_COUNT": "2"}
    config = servers(
        one=stdio("basic.py", env=rendezvous),
        two=stdio("basic.py", env=rendezvous),
        broken=stdio("exit_at_start.py"),
        missing={"command": str(tmp_path / "no-such-program")},
        off={"command": "anything", "disabled": True},
    )
    async with Downstream(config) as downstream:
        assert isinstance(downstream, ToolProvider)
        states = {name: s.state for name, s in downstream.status().items()}
        assert states == {
            "one": "connecting",
            "two": "connecting",
            "broken": "connecting",
            "missing": "connecting",
            "off": "disabled",
        }
        assert await downstream.wait_ready(READY)
        status = downstream.status()
        assert status["one"].state == status["two"].state == "connected"
        assert status["one"].tool_count == 7
        assert status["broken"].state == "failed"
        assert "MISSING_TOKEN is not set" in status["broken"].error
        assert status["missing"].state == "failed"
        assert "not found" in status["missing"].error
        assert "one.echo" in downstream.catalog()
        assert not any(name.startswith("broken.") for name in downstream.catalog())

        result = await downstream.call("one.echo", {"text": "still working"})
        assert result.text == "still working"

        reason = downstream.unavailable_reason("broken")
        assert reason is not None and "'broken'" in reason and "MISSING_TOKEN" in reason
        assert downstream.unavailable_reason("one") is None
        with pytest.raises(DownstreamError, match="MISSING_TOKEN"):
            await downstream.call("broken.deploy", {})


async def test_a_server_that_fails_to_start_is_retried_on_next_use_with_growing_backoff() -> None:
    async with Downstream(servers(broken=stdio("exit_at_start.py"))) as downstream:
        assert await downstream.wait_ready(READY)
        assert downstream.status()["broken"].failures == 1
        with pytest.raises(DownstreamError, match="MISSING_TOKEN") as err:
            await downstream.call("broken.anything", {})
        assert err.value.retryable
        assert downstream.status()["broken"].failures == 2


async def test_a_server_that_never_answers_the_handshake_fails_after_its_timeout(tmp_path: Path) -> None:
    config = servers(silent=stdio("silent.py", env={"PID_DIR": str(tmp_path)}, timeout=1))
    async with Downstream(config) as downstream:
        assert await downstream.wait_ready(READY)
        status = downstream.status()["silent"]
        assert status.state == "failed"
        assert "within 1s" in status.error
        pids = recorded_pids(tmp_path)
    assert len(pids) == 1
    assert not alive(pids[0])


def test_backoff_grows_and_is_capped() -> None:
    delays = [backoff_delay(n) for n in range(40)]
    assert delays[0] == 0
    assert delays == sorted(delays)
    assert max(delays) == BACKOFF_CAP


async def test_a_server_dying_mid_call_fails_the_call_retryably_and_the_next_call_restarts_it() -> None:
    async with Downstream(servers(crashy=stdio("crashy.py"))) as downstream:
        first_pid = (await downstream.call("crashy.pid", {})).text
        with pytest.raises(DownstreamError) as err:
            await downstream.call("crashy.die", {"message": "out of memory"})
        assert err.value.retryable
        assert "'crashy'" in str(err.value)
        assert "out of memory" in str(err.value)
        assert downstream.status()["crashy"].state == "failed"
        assert "crashy.pid" in downstream.catalog()

        second_pid = (await downstream.call("crashy.pid", {})).text
        assert second_pid != first_pid
        assert downstream.status()["crashy"].state == "connected"
        assert not alive(int(first_pid))


async def test_a_server_that_died_while_idle_is_noticed_and_restarted_by_the_next_call() -> None:
    lost = anyio.Event()

    def on_status(name: str) -> None:
        if downstream.status()[name].state == "failed":
            lost.set()

    downstream = Downstream(servers(crashy=stdio("crashy.py")), on_status_changed=on_status)
    async with downstream:
        first_pid = int((await downstream.call("crashy.pid", {})).text)
        os.kill(first_pid, signal.SIGKILL)
        with anyio.fail_after(10):
            await lost.wait()
        assert "connection lost" in downstream.status()["crashy"].error
        second_pid = int((await downstream.call("crashy.pid", {})).text)
        assert second_pid != first_pid
        assert downstream.status()["crashy"].state == "connected"


async def test_a_hanging_call_times_out_and_the_server_sees_the_cancellation(tmp_path: Path) -> None:
    record = tmp_path / "hang.log"
    config = servers(hang=stdio("hang.py", env={"HANG_RECORD": str(record)}, callTimeout=0.5))
    async with Downstream(config) as downstream:
        with pytest.raises(StepTimeoutError, match=r"hang\.hang did not answer within 0\.5s") as err:
            await downstream.call("hang.hang", {"tag": "t1"})
        assert err.value.retryable
        assert (await downstream.call("hang.wait_cancelled", {"tag": "t1"})).text == "cancelled"
    assert "cancelled t1" in record.read_text()


async def test_cancelling_the_caller_sends_the_cancellation_downstream(tmp_path: Path) -> None:
    record = tmp_path / "hang.log"
    config = servers(hang=stdio("hang.py", env={"HANG_RECORD": str(record)}))
    async with Downstream(config) as downstream:
        with anyio.fail_after(READY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(downstream.call, "hang.hang", {"tag": "t2"})
                await downstream.call("hang.wait_started", {"tag": "t2"})
                tg.cancel_scope.cancel()
            assert (await downstream.call("hang.wait_cancelled", {"tag": "t2"})).text == "cancelled"
        assert downstream.status()["hang"].state == "connected"
    assert "cancelled t2" in record.read_text()


async def test_large_and_non_text_content_is_kept_whole() -> None:
    async with Downstream(servers(basic=stdio("basic.py"))) as downstream:
        result = await downstream.call("basic.big", {"size": 100_000})
    assert result.text == "x" * 100_000
    assert result.size() > RESULT_PREVIEW_LIMIT
    kinds = [block["type"] for block in result.content]
    assert kinds == ["text", "image", "resource"]
    image = result.content[1]
    assert image["mimeType"] == "image/png"
    assert base64.b64decode(image["data"]).startswith(b"\x89PNG")
    assert result.content[2]["resource"] == {
        "uri": "file:///report.txt",
        "mimeType": "text/plain",
        "text": "the report",
    }


async def test_structured_content_text_and_catalog_metadata_come_through() -> None:
    async with Downstream(servers(basic=stdio("basic.py"))) as downstream:
        assert await downstream.wait_ready(READY)
        info = downstream.catalog()["basic.echo_structured"]
        result = await downstream.call("basic.echo_structured", {"text": "hi", "number": 2})
    assert info.server == "basic"
    assert info.description == "Return the arguments as structured content."
    assert info.input_schema is not None and info.input_schema["required"] == ["text"]
    assert info.output_schema is not None
    assert info.annotations == {"readOnlyHint": True, "idempotentHint": True}
    assert info.safe_to_rerun
    assert result.structured == {"text": "hi", "number": 2, "items": ["hi", "hi"]}
    assert result.value == result.structured
    assert '"number": 2' in result.text


async def test_an_error_result_becomes_a_retryable_tool_call_error_with_the_downstream_text() -> None:
    async with Downstream(servers(basic=stdio("basic.py"))) as downstream:
        with pytest.raises(ToolCallError, match="disk full on /var") as err:
            await downstream.call("basic.fail", {"message": "disk full on /var"})
    assert err.value.retryable
    assert "basic.fail" in str(err.value)


async def test_concurrent_calls_to_one_server_are_in_flight_together() -> None:
    async with Downstream(servers(basic=stdio("basic.py"))) as downstream:
        results: list[str] = []

        async def call() -> None:
            results.append((await downstream.call("basic.barrier", {"name": "b", "parties": 2})).text)

        with anyio.fail_after(READY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                tg.start_soon(call)
    assert results == ["barrier b passed with 2 calls"] * 2


@pytest.mark.parametrize("protocol", ["legacy", "auto"])
async def test_the_catalog_follows_tools_list_changed(protocol: str) -> None:
    changed = anyio.Event()

    def on_change(server: str) -> None:
        if "dynamic.fresh" in downstream.catalog():
            changed.set()

    downstream = Downstream(
        servers(dynamic=stdio("dynamic.py", protocol=protocol)), on_catalog_changed=on_change
    )
    async with downstream:
        assert await downstream.wait_ready(READY)
        assert "dynamic.fresh" not in downstream.catalog()
        await downstream.call("dynamic.add_tool", {"name": "fresh"})
        with anyio.fail_after(10):
            await changed.wait()
        assert downstream.catalog()["dynamic.fresh"].description == "added at run time: fresh"
        assert (await downstream.call("dynamic.fresh", {})).text == "fresh"
        assert downstream.status()["dynamic"].tool_count == 3


async def test_allowed_and_disabled_tools_filter_the_catalog_and_calls() -> None:
    config = servers(
        basic=stdio("basic.py", allowedTools=["echo", "fail", "big"], disabledTools=["fail"]),
        off={"command": "anything", "disabled": True},
    )
    async with Downstream(config) as downstream:
        assert await downstream.wait_ready(READY)
        assert sorted(downstream.catalog()) == ["basic.big", "basic.echo"]
        with pytest.raises(ToolNotFoundError, match="filtered out") as err:
            await downstream.call("basic.fail", {"message": "x"})
        assert not err.value.retryable
        with pytest.raises(ToolNotFoundError, match="filtered out"):
            await downstream.call("basic.sleep", {"seconds": 0})
        with pytest.raises(ToolNotFoundError, match="'off' is disabled"):
            await downstream.call("off.anything", {})
        assert downstream.status()["off"].state == "disabled"
        reason = downstream.unavailable_reason("off")
        assert reason is not None and "disabled" in reason


async def test_bare_names_resolve_when_unique_and_ambiguous_or_unknown_names_are_refused() -> None:
    config = servers(a=stdio("basic.py"), b=stdio("basic.py"), crashy=stdio("crashy.py"))
    async with Downstream(config) as downstream:
        assert await downstream.wait_ready(READY)
        assert (await downstream.call("pid", {})).text.isdigit()
        assert (await downstream.call("a.echo", {"text": "x"})).text == "x"
        with pytest.raises(ToolNotFoundError, match=r"ambiguous; use one of 'a.echo', 'b.echo'"):
            await downstream.call("echo", {"text": "x"})
        with pytest.raises(ToolNotFoundError, match="server 'a' has no tool 'nope'"):
            await downstream.call("a.nope", {})
        with pytest.raises(ToolNotFoundError, match="no tool named 'nope'"):
            await downstream.call("nope", {})


async def test_a_streamable_http_server_is_called_and_its_loss_is_a_downstream_error() -> None:
    process = await anyio.open_process([sys.executable, str(SERVERS / "http_server.py")])
    try:
        assert process.stdout is not None
        with anyio.fail_after(READY):
            line = b""
            while not line.endswith(b"\n"):
                line += await process.stdout.receive(1)
        url = f"http://127.0.0.1:{int(line)}/mcp"
        config = servers(remote={"type": "http", "url": url, "headers": {"X-Test": "1"}, "callTimeout": 10})
        async with Downstream(config) as downstream:
            assert await downstream.wait_ready(READY)
            assert downstream.status()["remote"].state == "connected"
            assert (await downstream.call("remote.echo", {"text": "over http"})).text == "over http"
            structured = await downstream.call("remote.echo_structured", {"text": "s"})
            assert structured.structured == {"text": "s", "number": 1, "items": ["s"]}

            process.terminate()
            with anyio.fail_after(10):
                await process.wait()
            with pytest.raises(DownstreamError, match="'remote'") as err:
                await downstream.call("remote.echo", {"text": "gone"})
            assert err.value.retryable
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.fail_after(10):
            await process.aclose()


async def test_leaving_the_context_closes_every_server_and_leaves_no_child_process(tmp_path: Path) -> None:
    env = {"PID_DIR": str(tmp_path)}
    config = servers(
        basic=stdio("basic.py", env=env), crashy=stdio("crashy.py", env=env), hang=stdio("hang.py", env=env)
    )
    errors: list[BaseException] = []

    async def hang_until_closed(downstream: Downstream) -> None:
        try:
            await downstream.call("hang.hang", {"tag": "shutdown"})
        except StepError as exc:
            errors.append(exc)

    with anyio.fail_after(READY + 20):
        async with anyio.create_task_group() as tg:
            async with Downstream(config) as downstream:
                assert await downstream.wait_ready(READY)
                tg.start_soon(hang_until_closed, downstream)
                await downstream.call("hang.wait_started", {"tag": "shutdown"})
    pids = recorded_pids(tmp_path)
    assert len(pids) == 3
    assert [pid for pid in pids if alive(pid)] == []
    assert [type(e) for e in errors] == [DownstreamError]
    assert os.getpid() not in pids


def test_results_convert_text_structured_and_every_block() -> None:
    result = types.CallToolResult(
        content=[
            types.TextContent(type="text", text="line one"),
            types.ImageContent(type="image", data="aGk=", mime_type="image/png"),
            types.TextContent(type="text", text="line two"),
        ],
        structured_content={"ok": True},
    )
    step = to_step_result(result)
    assert step.text == "line one\nline two"
    assert step.structured == {"ok": True}
    assert step.content == [
        {"type": "text", "text": "line one"},
        {"type": "image", "data": "aGk=", "mimeType": "image/png"},
        {"type": "text", "text": "line two"},
    ]
