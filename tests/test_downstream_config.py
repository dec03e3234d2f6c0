"""The servers file: the mcpServers format, ${VAR} expansion, and precise errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mcp_planner.downstream.config import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    ServersConfig,
    load_config,
)
from mcp_planner.errors import ConfigError


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "servers.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_stdio_server_fields_are_read_and_relative_cwd_is_resolved_against_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "mcpServers": {
                "git": {
                    "command": "uvx",
                    "args": ["mcp-server-git", "--repository", "."],
                    "env": {"GIT_TOKEN": "${TOKEN}"},
                    "cwd": "repo",
                }
            }
        },
    )
    config = load_config(path, {"TOKEN": "s3cret"})
    git = config.servers["git"]
    assert git.transport == "stdio"
    assert git.command == "uvx"
    assert git.args == ["mcp-server-git", "--repository", "."]
    assert git.env == {"GIT_TOKEN": "s3cret"}
    assert git.cwd == (tmp_path / "repo").resolve()
    assert git.timeout == DEFAULT_CONNECT_TIMEOUT
    assert git.call_timeout == DEFAULT_CALL_TIMEOUT
    assert config.source == path


def test_http_servers_accept_both_type_spellings_and_expand_headers() -> None:
    config = ServersConfig.from_dict(
        {
            "mcpServers": {
                "api": {
                    "type": "streamable-http",
                    "url": "http://127.0.0.1:${PORT}/mcp",
                    "headers": {"Authorization": "Bearer ${TOKEN}"},
                },
                "short": {"type": "http", "url": "http://127.0.0.1:9/mcp"},
            }
        },
        {"PORT": "8000", "TOKEN": "abc"},
    )
    api = config.servers["api"]
    assert api.transport == "streamable-http"
    assert api.url == "http://127.0.0.1:8000/mcp"
    assert api.headers == {"Authorization": "Bearer abc"}
    assert config.servers["short"].transport == "streamable-http"


def test_disabled_servers_filters_and_timeouts_are_read() -> None:
    config = ServersConfig.from_dict(
        {
            "mcpServers": {
                "fs": {
                    "command": "npx",
                    "allowedTools": ["read_file", "write_file"],
                    "disabledTools": ["write_file"],
                    "timeout": 5,
                    "callTimeout": 2.5,
                },
                "off": {"command": "nothing", "disabled": True},
            }
        }
    )
    fs = config.servers["fs"]
    assert fs.allows("read_file")
    assert not fs.allows("write_file")
    assert not fs.allows("delete_file")
    assert (fs.timeout, fs.call_timeout) == (5, 2.5)
    assert [s.name for s in config.enabled] == ["fs"]


def test_var_with_a_default_expands_to_the_default_when_unset() -> None:
    config = ServersConfig.from_dict(
        {"mcpServers": {"s": {"command": "${PY:-python3}", "args": ["--root=${ROOT:-}"]}}}, {}
    )
    assert config.servers["s"].command == "python3"
    assert config.servers["s"].args == ["--root="]


def test_an_unknown_variable_is_an_error_naming_the_variable_and_the_server(tmp_path: Path) -> None:
    path = write(
        tmp_path, {"mcpServers": {"api": {"type": "http", "url": "http://x", "headers": {"A": "${NOPE}"}}}}
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    message = str(err.value)
    assert "'NOPE'" in message
    assert "'api'" in message
    assert str(path) in message
    assert "headers.A" in message


def test_the_process_environment_is_never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONLY_IN_OS_ENVIRON", "x")
    with pytest.raises(ConfigError, match="ONLY_IN_OS_ENVIRON"):
        ServersConfig.from_dict({"mcpServers": {"s": {"command": "${ONLY_IN_OS_ENVIRON}"}}}, {})


@pytest.mark.parametrize(
    ("server", "field", "fragment"),
    [
        ({"args": ["x"]}, "(server)", "needs a non-empty 'command'"),
        ({"type": "http"}, "(server)", "needs a 'url'"),
        ({"command": "x", "args": "not-a-list"}, "args", "valid list"),
        ({"command": "x", "timeout": -1}, "timeout", "greater than 0"),
        ({"command": "x", "callTimeout": "soon"}, "callTimeout", "valid number"),
        ({"command": "x", "disabledTools": "write_file"}, "disabledTools", "valid list"),
        ({"type": "websocket", "url": "ws://x"}, "type", "must be 'stdio'"),
    ],
)
def test_a_malformed_server_names_file_server_and_field(
    tmp_path: Path, server: dict[str, Any], field: str, fragment: str
) -> None:
    path = write(tmp_path, {"mcpServers": {"broken": server}})
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    message = str(err.value)
    assert str(path) in message
    assert "server 'broken'" in message
    assert f"field {field!r}" in message
    assert fragment in message
    assert "pydantic" not in message


def test_a_file_that_is_not_json_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '{"mcpServers": {\n  "a": {"command": "x",}\n}}')
    with pytest.raises(ConfigError, match=r"line 2") as err:
        load_config(path, {})
    assert str(path) in str(err.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read servers config"):
        load_config(tmp_path / "nope.json", {})


@pytest.mark.parametrize("data", [[], {"servers": {}}, {"mcpServers": []}])
def test_a_file_without_an_mcpservers_object_is_refused(tmp_path: Path, data: Any) -> None:
    with pytest.raises(ConfigError, match="mcpServers"):
        load_config(write(tmp_path, data), {})


def test_a_server_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ConfigError, match="server 'a': expected an object"):
        ServersConfig.from_dict({"mcpServers": {"a": "python server.py"}})


def test_the_example_servers_file_loads_with_python_from_the_environment() -> None:
    path = Path(__file__).parent.parent / "examples" / "servers.json"
    config = load_config(path, {"PYTHON": "/usr/bin/python3"})
    assert set(config.servers) == {"workspace", "ci"}
    for server in config.servers.values():
        assert server.command == "/usr/bin/python3"
        assert server.cwd == path.parent.resolve()


def test_a_server_defined_twice_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '{"mcpServers": {"a": {"command": "x"}, "a": {"command": "y"}}}')
    with pytest.raises(ConfigError, match="key 'a' appears twice"):
        load_config(path, {})
