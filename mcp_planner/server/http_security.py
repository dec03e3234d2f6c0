"""Who may talk to the planner over streamable HTTP: Host/Origin checks and a bearer token.

Anyone who reaches the HTTP endpoint can create, approve and execute plans, so:
- on a loopback address, the Host and Origin headers must name the loopback address (a web page that
  rebinds its own DNS name to 127.0.0.1 sends its own name, and is refused); a token is optional;
- on any other address, the server starts only with a token (checked as `Authorization: Bearer` on
  every request) and an explicit list of the host names clients use, checked the same way.

Both are the MCP SDK's own mechanisms: `TransportSecuritySettings` for the headers, a `TokenVerifier`
for the token.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence
from typing import Any

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.transport_security import TransportSecuritySettings

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, *, auth_token: str | None, allowed_hosts: Sequence[str]) -> None:
    """Refuse to serve a non-loopback address without a token and a host list.

    Raises:
        ValueError: `host` is not loopback and the token or the allowed hosts are missing.
    """
    if is_loopback(host):
        return
    allowed_hosts = [name for name in allowed_hosts if name.strip()]
    missing = [
        *(["an auth token (--auth-token or MCP_PLANNER_AUTH_TOKEN)"] if not auth_token else []),
        *(["--allowed-host NAME for each host name clients use"] if not allowed_hosts else []),
    ]
    if missing:
        raise ValueError(
            f"refusing to serve HTTP on {host!r} without {' and '.join(missing)}: "
            "anyone who reaches it could run plans (or bind 127.0.0.1 instead)"
        )


def transport_security(host: str, port: int, allowed_hosts: Sequence[str] = ()) -> TransportSecuritySettings:
    """The Host and Origin values the server accepts, always checked.

    A name without a port matches any port (a reverse proxy may omit it or use its own); on a loopback
    address the loopback names with the bound port are allowed as well. Call `check_bind` first.
    """
    hosts = [pattern for name in allowed_hosts if name.strip() for pattern in _patterns(name.strip())]
    if is_loopback(host):
        local = dict.fromkeys([*_LOOPBACK_NAMES, _bracketed(host)])
        hosts = [f"{name}:{port}" if port else f"{name}:*" for name in local] + hosts
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=hosts,
        allowed_origins=[f"{scheme}://{pattern}" for pattern in hosts for scheme in ("http", "https")],
    )


def bearer_auth(token: str | None) -> dict[str, Any]:
    """`MCPServer` keyword arguments that require `Authorization: Bearer <token>` on HTTP ({} for none)."""
    if not token:
        return {}
    # The SDK's auth settings are OAuth's; with no authorization server and no resource URL the issuer
    # is never advertised, but the field is required.
    settings = AuthSettings(issuer_url="http://localhost", resource_server_url=None)  # type: ignore[arg-type]
    return {"auth": settings, "token_verifier": StaticTokenVerifier(token)}


class StaticTokenVerifier:
    """Accepts one shared secret, compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        if not hmac.compare_digest(token.encode(), self._token):
            return None
        return AccessToken(token=token, client_id="mcp-planner", scopes=[])


def _bracketed(name: str) -> str:
    """IPv6 literals as they appear in a Host header."""
    try:
        return f"[{name}]" if ipaddress.ip_address(name).version == 6 else name
    except ValueError:
        return name


def _patterns(name: str) -> list[str]:
    name = _bracketed(name)
    has_port = name.rsplit("]", 1)[-1].count(":") == 1
    return [name] if has_port else [name, f"{name}:*"]
