"""A throwaway PostgreSQL server for the tests, the bench and CI: `initdb` into a temporary directory,
`pg_ctl start` on a free loopback port, and `stop` deletes it all. No containers: the distribution's
PostgreSQL binaries (Debian's `postgresql` package puts them in /usr/lib/postgresql/<version>/bin).

    python tests/pg_cluster.py start DIR   # prints the server's URL; the server keeps running
    python tests/pg_cluster.py stop DIR

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user. Durability is off
(fsync, synchronous_commit): the tests need the semantics, not the disk.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path


class ClusterError(RuntimeError):
    """PostgreSQL could not be started here; the message says why."""


def bin_dir() -> Path:
    """The newest installed PostgreSQL's binaries (or those on PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise ClusterError("no PostgreSQL server binaries (initdb) found: apt-get install postgresql")
    return Path(initdb).parent


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise ClusterError("running as root and there is no 'postgres' user to run the server") from exc
    return ["runuser", "-u", "postgres", "--", *cmd]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str]) -> None:
    done = subprocess.run(_as_server_user(cmd), capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise ClusterError(f"{Path(cmd[0]).name} failed: {(done.stderr or done.stdout).strip()[-500:]}")


def start(directory: Path) -> str:
    """Create and start a server in `directory` (new or empty); its URL (database `postgres`)."""
    binaries = bin_dir()
    directory.mkdir(parents=True, exist_ok=True)
    data, sockets = directory / "data", directory / "sockets"
    sockets.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        for path in (directory, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    _run([str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    port = _free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c max_connections=300"
    )
    _run([str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(directory / "server.log"), "-w",
          "start"])  # fmt: skip
    (directory / "url").write_text(url := f"postgresql://postgres@127.0.0.1:{port}/postgres")
    return url


def create_database(server: str, prefix: str = "t") -> str:
    """A new, empty database on the server at URL `server`; its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    _admin(server, f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + f"/{name}"


def drop_database(server: str, url: str) -> None:
    """Drop the database at `url` (made by `create_database`), ending whatever still uses it."""
    _admin(server, f"DROP DATABASE {url.rsplit('/', 1)[1]} WITH (FORCE)")


def _admin(server: str, statement: str) -> None:
    import psycopg  # the postgres extra: only what makes databases needs it

    with psycopg.connect(server, autocommit=True, connect_timeout=10) as conn:
        conn.execute(statement)  # type: ignore[arg-type]  # a name made here, not user input


def stop(directory: Path) -> None:
    """Stop the server in `directory` (if it runs) and delete the directory."""
    if (directory / "data" / "postmaster.pid").exists():
        try:
            _run([str(bin_dir() / "pg_ctl"), "-D", str(directory / "data"), "-m", "immediate", "stop"])
        except ClusterError:
            pass
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    action, where = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        try:
            print(start(where))
        except ClusterError as exc:
            sys.exit(f"cannot start PostgreSQL: {exc}")
    else:
        stop(where)
