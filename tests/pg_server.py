"""A throwaway PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` in a temp folder, on 127.0.0.1 only.

Uses Debian's ``postgresql`` package binaries (``/usr/lib/postgresql/<version>/bin``; ``PG_BIN`` overrides).
PostgreSQL refuses to run as root, so under root the server runs as the ``postgres`` user the package
creates (or ``nobody``) through ``runuser``; otherwise as the current user. Password login
(scram-sha-256) only, no Unix socket outside the temp folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

USER, PASSWORD, DATABASE = "wsss", "s3cret-pw", "optuna"


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str
    password: str
    database: str

    def url(self, password: str | None = None, database: str | None = None) -> str:
        """A SQLAlchemy URL with the psycopg 3 driver (the ``postgres`` extra)."""
        pw = self.password if password is None else password
        creds = f"{self.user}:{pw}" if pw else self.user  # "": no password in the URL (libpq's PGPASSWORD)
        return f"postgresql+psycopg://{creds}@{self.host}:{self.port}/{database or self.database}"


def pg_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (newest installed version), or None."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user() -> tuple[list[str], int | None, int | None]:
    """Command prefix, uid and gid to run the server's binaries with (PostgreSQL will not run as root)."""
    if os.geteuid() != 0:
        return [], None, None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"], pw.pw_uid, pw.pw_gid
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")


@contextlib.contextmanager
def running_server(bin_dir: Path) -> Iterator[PgServer]:
    """Start a fresh cluster with user :data:`USER` and database :data:`DATABASE`; stop and delete it after."""
    prefix, uid, gid = _as_server_user()
    # Not under pytest's tmp_path: that is private to root, and the server user must own its folder.
    root = Path(tempfile.mkdtemp(prefix="wsss-pg-"))
    data, log, pwfile = root / "data", root / "server.log", root / "pwfile"
    pwfile.write_text(PASSWORD + "\n")
    if uid is not None:
        os.chown(root, uid, gid)
        os.chown(pwfile, uid, gid)
    port = _free_port()

    def run(*cmd: str, as_server: bool = True) -> None:
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        subprocess.run([*(prefix if as_server else []), *cmd], check=True, capture_output=True, text=True,
                       timeout=120, cwd=root, env=env)

    started = False
    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(pwfile),
            "--auth", "scram-sha-256", "-E", "UTF8", "--no-sync")
        opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off"
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start")
        started = True
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE, as_server=False)
        yield PgServer("127.0.0.1", port, USER, PASSWORD, DATABASE)
    except subprocess.CalledProcessError as exc:
        detail = log.read_text() if log.exists() else ""
        raise RuntimeError(f"{' '.join(exc.cmd)} failed: {exc.stderr}{detail}") from None
    finally:
        if started:
            with contextlib.suppress(subprocess.SubprocessError):
                run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
