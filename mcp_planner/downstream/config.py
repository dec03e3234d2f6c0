"""The downstream servers file, in the `mcpServers` format Claude Desktop and Claude Code use.

```json
{"mcpServers": {
  "git": {"command": "uvx", "args": ["mcp-server-git"], "env": {"X": "${X}"}, "cwd": "."},
  "api": {"type": "streamable-http", "url": "http://127.0.0.1:8000/mcp",
          "headers": {"Authorization": "Bearer ${TOKEN}"}},
  "fs":  {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp/x"],
          "disabledTools": ["write_file"], "timeout": 60, "callTimeout": 30},
  "off": {"command": "...", "disabled": true}
}}
```

`${VAR}` (and `${VAR:-default}`) expands in `command`, `args`, `env`, `cwd`, `url` and `headers` from an
environment mapping the caller passes in; this module never reads `os.environ` (the CLI does). A relative
`cwd` is resolved against the config file's directory. Every problem becomes a `ConfigError` naming the
file, the server and the field.

What a `${VAR}` expanded to may be a secret (a token in a URL or a header), so the config remembers those
values and `redact()` puts `${VAR}` back in any text bound for an error, a log or the store; the repr of a
config never shows them either.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from mcp_planner.engine.builtins import BUILTIN_SERVER, BUILTINS
from mcp_planner.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 30.0
"""Seconds to start a server and list its tools (a first `npx`/`uvx` run downloads packages)."""

DEFAULT_CALL_TIMEOUT = 300.0
"""Seconds one tool call may take when the step sets no tighter timeout."""

#: Shorter expansions ("1", "on", "dev") are not treated as secrets: replacing them would garble messages.
MIN_SECRET_LENGTH = 4

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_EXPANDED_FIELDS = ("command", "args", "env", "cwd", "url", "headers")
_KNOWN_KEYS = {
    "type",
    "transport",
    "command",
    "args",
    "env",
    "cwd",
    "url",
    "headers",
    "disabled",
    "allowedTools",
    "disabledTools",
    "timeout",
    "callTimeout",
    "protocol",
}


@dataclass(frozen=True)
class Redactor:
    """Replaces the values `${VAR}` references expanded to with `${VAR}`.

    `${VAR:-default}` defaults are written in the file, so they are not secret and not replaced.
    """

    values: tuple[tuple[str, str], ...] = ()
    """(value, variable) pairs, longest value first, so a secret containing another is replaced whole."""

    @classmethod
    def of(cls, expanded: Mapping[str, str]) -> Redactor:
        """From `{value: variable}`: each value also in its URL-encoded forms, as URLs and logs carry it."""
        pairs: dict[str, str] = {}
        for value, var in expanded.items():
            if len(value) >= MIN_SECRET_LENGTH:
                for form in (value, quote(value, safe=""), quote(value)):
                    pairs.setdefault(form, var)
        return cls._sorted(pairs)

    @classmethod
    def merge(cls, redactors: Iterable[Redactor]) -> Redactor:
        pairs: dict[str, str] = {}
        for redactor in redactors:
            for value, var in redactor.values:
                pairs.setdefault(value, var)
        return cls._sorted(pairs)

    @classmethod
    def _sorted(cls, pairs: Mapping[str, str]) -> Redactor:
        return cls(tuple(sorted(pairs.items(), key=lambda pair: -len(pair[0]))))

    def __call__(self, text: str) -> str:
        for value, var in self.values:
            if value in text:
                text = text.replace(value, f"${{{var}}}")
        return text

    def __bool__(self) -> bool:
        return bool(self.values)

    def __repr__(self) -> str:
        return f"Redactor({len(self.values)} values)"


class _Redacting(BaseModel):
    """A config whose text (repr, str, what `redact` is given) shows `${VAR}`, never what it expanded to."""

    _redactor: Redactor = PrivateAttr(default_factory=Redactor)

    @property
    def redactor(self) -> Redactor:
        """Puts `${VAR}` back for what the `${VAR}` references of this config expanded to."""
        return self._redactor

    def redact(self, text: str) -> str:
        """`text` with every expanded `${VAR}` value replaced by `${VAR}` (for errors, logs, the store)."""
        return self._redactor(text)

    def __repr__(self) -> str:
        return self._redactor(super().__repr__())

    def __str__(self) -> str:
        return self._redactor(super().__str__())


class ServerConfig(_Redacting):
    """One downstream server.

    `transport` is `stdio` (a `command` run as a subprocess) or `streamable-http` (a `url`); the file
    spells it `type`, and `"http"` is accepted for `streamable-http`. `protocol` chooses the handshake:
    `legacy` (the `initialize` handshake every published server speaks) or `auto` (probe the 2026
    `server/discover` first).
    """

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    name: str
    transport: Literal["stdio", "streamable-http", "sse"] = Field("stdio", alias="type")
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    disabled: bool = False
    allowed_tools: list[str] | None = Field(None, alias="allowedTools")
    disabled_tools: list[str] = Field(default_factory=list, alias="disabledTools")
    timeout: float = Field(DEFAULT_CONNECT_TIMEOUT, gt=0)
    call_timeout: float = Field(DEFAULT_CALL_TIMEOUT, gt=0, alias="callTimeout")
    protocol: Literal["legacy", "auto"] = "legacy"

    @model_validator(mode="before")
    @classmethod
    def _normalise_type(cls, data: Any) -> Any:
        if isinstance(data, dict):
            kind = data.get("type", data.get("transport"))
            if kind == "http":
                kind = "streamable-http"
            if kind is None:
                kind = "streamable-http" if "url" in data and "command" not in data else "stdio"
            data = {k: v for k, v in data.items() if k != "transport"} | {"type": kind}
        return data

    @model_validator(mode="after")
    def _check_transport_fields(self) -> ServerConfig:
        if self.transport == "stdio" and not self.command:
            raise ValueError("a stdio server needs a non-empty 'command' (or set 'type' and 'url')")
        if self.transport != "stdio" and not self.url:
            raise ValueError(f"a {self.transport} server needs a 'url'")
        return self

    def allows(self, tool: str) -> bool:
        """Whether the `allowedTools` / `disabledTools` filters let `tool` (the server's own name) in."""
        if self.allowed_tools is not None and tool not in self.allowed_tools:
            return False
        return tool not in self.disabled_tools


class ServersConfig(_Redacting):
    """Every downstream server, in file order. `source` is the file it came from, if any."""

    model_config = ConfigDict(frozen=True)

    servers: dict[str, ServerConfig] = Field(default_factory=dict)
    source: Path | None = None

    def model_post_init(self, context: Any, /) -> None:
        self._redactor = Redactor.merge(s.redactor for s in self.servers.values())

    @property
    def enabled(self) -> list[ServerConfig]:
        return [s for s in self.servers.values() if not s.disabled]

    @classmethod
    def from_dict(
        cls,
        data: Any,
        env: Mapping[str, str] | None = None,
        base_dir: Path | str | None = None,
        *,
        source: Path | None = None,
    ) -> ServersConfig:
        """Build the config from already-parsed JSON.

        Args:
            data: `{"mcpServers": {name: {...}}}`.
            env: Where `${VAR}` is looked up (nothing else is read from the environment).
            base_dir: What a relative `cwd` is relative to (the config file's directory).
            source: The file, named in error messages.

        Raises:
            ConfigError: the data is malformed, naming the server and field.
        """
        where = str(source) if source is not None else "servers config"
        env = env or {}
        if not isinstance(data, dict) or not isinstance(data.get("mcpServers"), dict):
            raise ConfigError(
                f"{where}: expected a JSON object with an 'mcpServers' object mapping server names to servers"
            )
        base = Path(base_dir) if base_dir is not None else None
        servers: dict[str, ServerConfig] = {}
        for name, raw in data["mcpServers"].items():
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: server {name!r}: expected an object, got {type(raw).__name__}")
            if not name.strip():
                raise ConfigError(f"{where}: a server has an empty name; give it a short identifier")
            if name == BUILTIN_SERVER:
                raise ConfigError(
                    f"{where}: server {name!r}: {BUILTIN_SERVER!r} is reserved for the built-in tools "
                    f"({', '.join(sorted(BUILTINS))}); give the server another name"
                )
            unknown = sorted(set(raw) - _KNOWN_KEYS)
            if unknown:
                logger.warning("%s: server %r: ignoring unknown field(s) %s", where, name, unknown)
            expanded = dict(raw)
            secrets: dict[str, str] = {}
            for key in _EXPANDED_FIELDS:
                if key in expanded:
                    expanded[key] = _expand(
                        expanded[key], env, where=where, server=name, field=key, secrets=secrets
                    )
            redactor = Redactor.of(secrets)
            try:
                server = ServerConfig.model_validate({**expanded, "name": name})
            except ValidationError as exc:
                raise ConfigError(redactor(_describe(exc, where, name))) from None
            server._redactor = redactor
            if server.cwd is not None and not server.cwd.is_absolute() and base is not None:
                server = server.model_copy(update={"cwd": (base / server.cwd).resolve()})
            servers[name] = server
        return cls(servers=servers, source=source)


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> ServersConfig:
    """Read a servers file.

    Args:
        path: The JSON file.
        env: Where `${VAR}` is looked up; the CLI passes `os.environ` (plus `PYTHON`).

    Raises:
        ConfigError: the file is missing, not JSON, or malformed; the message names file, server, field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read servers config {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: key {exc.args[0]!r} appears twice in one object; keep one") from None
    return ServersConfig.from_dict(data, env, path.resolve().parent, source=path)


class _DuplicateKey(Exception):
    pass


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; for two servers of one name that hides a mistake.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _expand(
    value: Any, env: Mapping[str, str], *, where: str, server: str, field: str, secrets: dict[str, str]
) -> Any:
    """Expand `${VAR}` in a string, or in every string of a list / the values of an object.

    Each value taken from `env` is recorded in `secrets` as `{value: VAR}`.
    """
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            var, default = match.group(1), match.group(2)
            if var in env:
                secrets.setdefault(env[var], var)
                return env[var]
            if default is not None:
                return default
            raise ConfigError(
                f"{where}: server {server!r}, field {field!r}: environment variable {var!r} is not set; "
                f"set it, or write ${{{var}:-default}} to give a default"
            )

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, env, where=where, server=server, field=field, secrets=secrets) for v in value]
    if isinstance(value, dict):
        return {
            k: _expand(v, env, where=where, server=server, field=f"{field}.{k}", secrets=secrets)
            for k, v in value.items()
        }
    return value


def _describe(exc: ValidationError, where: str, server: str) -> str:
    """One line per pydantic error, in our words: file, server, field (file spelling), problem."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(server)"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error" and loc == "type":
            message = "must be 'stdio', 'streamable-http' (or 'http') or 'sse'"
        lines.append(f"{where}: server {server!r}, field {loc!r}: {message}")
    return "\n".join(lines)
