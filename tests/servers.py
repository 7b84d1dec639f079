"""Throwaway servers for integration tests: a PostgreSQL cluster and an MLflow tracking server.

Both listen on 127.0.0.1 only, on free ports, and stop by themselves: each has a watchdog
process that stops it when the test process is gone, even after a SIGKILL of pytest.
PostgreSQL runs as an unprivileged user (initdb refuses root): `nobody` when the tests run as root.
Both are open by default; given a password, PostgreSQL requires it (scram-sha-256) and the MLflow
server runs its basic-auth app with an admin user of that password.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

WATCHDOG = """
import os, signal, subprocess, sys, time
parent, user, command = int(sys.argv[1]), sys.argv[2] or None, sys.argv[3:]
while True:
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        break
    time.sleep(1)
if command[0] == "killpg":  # killpg PGID WORD: the group, if a member's command line still holds WORD
    pgid, word = int(command[1]), command[2]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            same = os.getpgid(int(pid)) == pgid
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue
        if same and word in cmdline:
            os.killpg(pgid, signal.SIGTERM)
            break
else:
    subprocess.run(command, user=user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def pg_bindir() -> Path | None:
    """PostgreSQL's server binaries: $BENCH_PG_BIN, pg_ctl on PATH, /usr/lib/postgresql/*/bin,
    or the pgserver wheel that .ci/run installs on machines without a server."""
    candidates = [os.environ.get("BENCH_PG_BIN")]
    if shutil.which("pg_ctl"):
        candidates.append(str(Path(os.path.realpath(shutil.which("pg_ctl"))).parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    try:
        import pgserver

        candidates.append(str(Path(pgserver.__file__).parent / "pginstall" / "bin"))
    except ImportError:
        pass
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def _watch(command: list[str], user: str | None = None) -> None:
    """Run `command` (as `user`) once this process is gone: a detached watchdog."""
    subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(os.getpid()), user or "", *command],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class Postgres:
    """initdb + pg_ctl start on 127.0.0.1:<free port>; databases made with `create`. With a
    `password`, every connection of the user `bench` must give it (scram-sha-256)."""

    def __init__(self, bindir: Path, password: str | None = None) -> None:
        self.bindir = bindir
        self.password = password
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        self.data = self.root / "data"
        self.user = "nobody" if os.geteuid() == 0 else None
        os.chmod(self.root, 0o755)
        if self.user:
            shutil.chown(self.root, self.user)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # The password reaches client programs (createdb) through libpq's PGPASSWORD, never argv.
        env = {**os.environ, "PGPASSWORD": self.password} if self.password else None
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.user,
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def _options(self) -> str:
        return (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} -c fsync=off"
            " -c password_encryption=scram-sha-256"
        )

    def start(self) -> Postgres:
        auth = ["--auth=trust"]
        if self.password:  # initdb reads the superuser's password from a file, removed once read
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            os.chmod(pwfile, 0o600)
            if self.user:
                shutil.chown(pwfile, self.user)
            auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        try:
            self._run("initdb", "-D", str(self.data), "-U", "bench", *auth, "-E", "UTF8", "--no-sync")
        finally:
            (self.root / "pwfile").unlink(missing_ok=True)
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            self._options(),
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        stop = [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]
        _watch(stop, self.user)
        return self

    def create(self, database: str) -> str:
        """A new database; returns its SQLAlchemy URL (psycopg 3 driver), with the password
        percent-encoded in it when the server has one."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "bench", database)
        return self.url(database, self.password)

    def url(self, database: str, password: str | None = None) -> str:
        """The database's URL as user `bench`, with `password` (any, to try a wrong one) or none."""
        user = f"bench:{quote(password, safe='')}" if password else "bench"
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{database}"

    def running(self) -> bool:
        return listening(self.port)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server (fast: open sessions are ended, their transactions rolled back), stay
        down `down_s` seconds, and start it again on the same port with the same data."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        time.sleep(down_s)
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            self._options(),
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


# Straight to loopback, never through a proxy: urllib.request.urlopen keeps the proxies of the
# environment at its first call, and tests that forbid downloads point them at a closed port.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<free port> with a database backend and served artifacts.

    With an `admin_password`, the server runs MLflow's basic-auth app: every request but /health
    needs a user's credentials; the user `admin` with that password is made at the first start.
    Its ini file (users in their own SQLite database beside the artifacts) is named by
    MLFLOW_AUTH_CONFIG_PATH; the backend URL, which may hold the database's password, goes by
    MLFLOW_BACKEND_STORE_URI: neither password is in the server's argv."""

    ADMIN = "admin"

    def __init__(self, backend_uri: str, artifacts: Path, admin_password: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).with_name("mlflow")
        self.command = [
            str(exe),
            "server",
            "--artifacts-destination",
            artifacts.as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        self.env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend_uri}
        if admin_password:
            ini = artifacts.parent / "basic_auth.ini"
            ini.write_text(
                "[mlflow]\ndefault_permission = READ\n"
                f"database_uri = sqlite:///{artifacts.parent / 'basic_auth.db'}\n"
                f"admin_username = {self.ADMIN}\nadmin_password = {admin_password.replace('%', '%%')}\n"
            )  # configparser: %% is %
            os.chmod(ini, 0o600)
            self.command += ["--app-name", "basic-auth"]
            # The key signs the app's CSRF tokens; the app refuses to start without one.
            self.env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
        self.log = open(artifacts.parent / "mlflow-server.log", "a")
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            self.command, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        _watch(["killpg", str(self.proc.pid), "mlflow"])

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server (SIGTERM: requests in flight may lose their replies), stay down
        `down_s` seconds, and start it again on the same port; returns once it answers."""
        self._kill()
        time.sleep(down_s)
        self._start()
        self.wait_ready()

    def wait_ready(self, timeout: float = 180) -> MlflowServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with DIRECT.open(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server did not answer on {self.url} within {timeout} s")

    def running(self) -> bool:
        return self.proc.poll() is None or listening(self.port)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def stop(self) -> None:
        self._kill()
        self.log.close()


@contextmanager
def pair(artifacts_parent: Path):
    """A PostgreSQL cluster with databases `optuna` and `mlflow`, and an `mlflow server` on the
    second, both stopped (and checked stopped) at the end: yields their URLs and the servers."""
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError(
            "no PostgreSQL server binaries: install the dev extra (it brings pgserver) or set BENCH_PG_BIN"
        )
    pg = Postgres(bindir).start()
    mlflow_server = None
    try:
        optuna_url = pg.create("optuna")
        artifacts = artifacts_parent / "artifacts"
        artifacts.mkdir()
        mlflow_server = MlflowServer(pg.create("mlflow"), artifacts).wait_ready()
        yield {"storage": optuna_url, "tracking": mlflow_server.url, "pg": pg, "mlflow": mlflow_server}
    finally:
        if mlflow_server is not None:
            mlflow_server.stop()
        pg.stop()
    assert not pg.running() and (mlflow_server is None or not mlflow_server.running())
