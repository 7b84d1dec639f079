"""What every bench process sets up once, the worker processes of `bench run --workers` included:
the log (passwords hidden), SIGTERM as a stop, the console (the libraries quiet), the allocator.

The console: bench's own lines, one per event. The libraries' output (MLflow's "View run ... at"
lines, MLflow's and Optuna's logs, Python warnings) shows only with --debug, which also logs
bench's DEBUG records. MLflow reads its two variables when it prints a run's link and when it is
imported, so they also reach the worker processes of `bench tune`; a library imported later is
quieted where bench imports it (`quiet`), as its import resets its logger.

The allocator: freed memory stays with the process. A training step frees and allocates the same
activations, gradients and batches every step. glibc's malloc adjusts two thresholds as a process
runs: blocks above the first come from fresh mmap calls, and free space above the second at the
top of a heap goes back to the kernel. Where they settle depends on the order of earlier
allocations, and when they settle low, every step hands its memory back and faults it in again
page by page: on this suite's CPU runs, 2-3 million page faults and 4-6 s of system time in 3
epochs of the fine-tune, 10-17 % of its speed, in some runs of the same code and not in others.
`keep_freed_memory()` fixes both thresholds: blocks up to MMAP_THRESHOLD come from the heap, and
up to TRIM_THRESHOLD of free space stays there, as a GPU's caching allocator keeps its memory
(blocks above 32 MiB, glibc's ceiling, are still mapped and unmapped each time). A process may
then hold that much more memory than it uses at the moment. `setup` calls it before any work,
and `bench perf` before measuring. The environment's own settings win: with MALLOC_*_ variables
or threshold tunables in GLIBC_TUNABLES, a preloaded allocator (jemalloc, tcmalloc, mimalloc),
or another C library (musl, macOS, Windows), nothing is changed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import warnings

from bench.errors import password, scrub


@contextlib.contextmanager
def setup(args):
    """A bench process's setup for the command `args`, the worker processes of `bench run --workers`
    included: the log, passwords hidden, memory, SIGTERM, the console. Yields the store URLs to hide."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    urls = guard_passwords(args)
    keep_freed_memory()  # before any work: training re-uses its memory every step
    with stopping_on_sigterm(), terminal(args.debug, secret=any(password(u) for u in urls)):
        yield urls


# --- the log: passwords hidden ------------------------------------------------------------------

_shown_urls: list[str] = []  # the store URLs of the running command, whose passwords logs must not show


def _hiding_passwords(make_record):
    """A log record factory that replaces those passwords in every record, tracebacks included,
    whichever library logs it (a driver's or MLflow's message may quote a URL)."""

    def make(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if _shown_urls:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            clean = scrub(text, _shown_urls)
            if clean != text:
                record.msg, record.args, record.exc_info, record.exc_text = clean, None, None, None
        return record

    make.hides_passwords = True
    return make


def guard_passwords(args) -> list[str]:
    """Registers the store URLs this command may show; returns them."""
    urls = [
        getattr(args, "tracking_uri", None),
        getattr(args, "storage", None),
        os.environ.get("MLFLOW_TRACKING_URI"),
        os.environ.get("BENCH_OPTUNA_STORAGE"),
    ]
    _shown_urls[:] = [u for u in urls if u]
    if not getattr(logging.getLogRecordFactory(), "hides_passwords", False):
        logging.setLogRecordFactory(_hiding_passwords(logging.getLogRecordFactory()))
    return list(_shown_urls)


# --- signals --------------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM, as SLURM and Kubernetes send it some time before they kill: the work in progress
    stops as it does on Ctrl-C (the last finished epoch kept, metrics flushed, the run KILLED)."""

    signal_name = "SIGTERM"


def terminated(signum, frame) -> None:
    # One clean stop: a second SIGTERM while it runs does not cut it short (SIGKILL still does).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextlib.contextmanager
def stopping_on_sigterm():
    """SIGTERM raises Terminated while the command runs (in the main thread only, where Python
    delivers signals); the handler before it comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(stop: BaseException) -> int:
    """The exit code of a process that a stop ended: 143 for SIGTERM, 130 for SIGINT (128 + its number)."""
    return 143 if getattr(stop, "signal_name", "SIGINT") == "SIGTERM" else 130


# --- the console: the libraries quiet ---------------------------------------------------------------

# urllib3 logs each of MLflow's HTTP retries; while a server is away bench says so once (bench.servers.retry).
QUIET_LEVELS = {
    "mlflow": logging.WARNING,
    "alembic": logging.WARNING,
    "optuna": logging.ERROR,
    "urllib3.connectionpool": logging.ERROR,
}
# Warnings raised in these packages, and Optuna's "... is experimental" wherever it is attributed:
# torch's stay, as one is the only sign of a nondeterministic operation (warn_only).
QUIET_WARNINGS_FROM = r"(mlflow|optuna|optuna_dashboard|alembic|sqlalchemy|pydantic|matplotlib|seaborn)(\.|$)"
QUIET_ENV = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_LOGGING_LEVEL": "WARNING"}
_debug = False


def quiet(name: str) -> None:
    """The library's logger at its quiet level, unless the running command has --debug. Optuna
    logs each failed trial with its traceback: bench prints its own line for it."""
    if not _debug:
        logging.getLogger(name).setLevel(QUIET_LEVELS[name])


@contextlib.contextmanager
def terminal(debug: bool, secret: bool = False):
    """The console of one command; the levels, variables and warning filters before it come back after.
    `secret`: a store URL of the command holds a password, which MLflow's link lines would print
    (they are print() calls, not log records bench can scrub): they stay hidden under --debug too."""
    global _debug
    names = [*QUIET_LEVELS, "bench"]
    levels = {name: logging.getLogger(name).level for name in names}
    env = {key: os.environ.get(key) for key in QUIET_ENV}
    _debug = debug
    try:
        with warnings.catch_warnings():
            if debug:
                _show_libraries(secret)
            else:
                _quiet_libraries()
            yield
    finally:
        _debug = False
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _show_libraries(secret: bool) -> None:
    if secret:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    logging.getLogger("bench").setLevel(logging.DEBUG)
    for name in QUIET_LEVELS:
        logging.getLogger(name).setLevel(logging.INFO)  # the libraries' own default


def _quiet_libraries() -> None:
    os.environ.update(QUIET_ENV)
    for name in QUIET_LEVELS:
        quiet(name)
    warnings.filterwarnings("ignore", module=QUIET_WARNINGS_FROM)
    warnings.filterwarnings("ignore", message=r".* is experimental")


# --- the allocator: freed memory kept --------------------------------------------------------------

TRIM_THRESHOLD = 1 << 30  # bytes of free space at the top of a heap kept before any goes back
MMAP_THRESHOLD = 32 << 20  # the largest block served from the heap: glibc's own ceiling on 64-bit

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_USER_TUNABLES = (
    "glibc.malloc.trim_threshold",
    "glibc.malloc.mmap_threshold",
    "glibc.malloc.top_pad",
    "glibc.malloc.mmap_max",
)


def glibc_version() -> str | None:
    """The C library's version when it is glibc, else None."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    return name.split()[-1] if name and name.startswith("glibc") else None


def user_settings() -> list[str]:
    """The environment's own settings of the thresholds, which this module leaves in charge."""
    found = [v for v in _USER_SETTINGS if v in os.environ]
    if any(t in os.environ.get("GLIBC_TUNABLES", "") for t in _USER_TUNABLES):
        found.append("GLIBC_TUNABLES")
    return found


def preloaded_allocator() -> str | None:
    """The malloc library preloaded in place of glibc's (LD_PRELOAD=.../libjemalloc.so.2), if any."""
    for lib in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        name = os.path.basename(lib)
        if "malloc" in name:
            return name
    return None


def keep_freed_memory() -> str:
    """Fix glibc's malloc thresholds where nothing else has set them; says what the allocator is."""
    version = glibc_version()
    if version is None:
        return "the C library's default"
    if preloaded_allocator():
        return f"{preloaded_allocator()}, preloaded"
    if user_settings():
        return f"glibc {version}, as set by {', '.join(user_settings())}"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: setting either one ends glibc's own adjustment of both.
    if not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return f"glibc {version}, default (mallopt refused a {MMAP_THRESHOLD >> 20} MiB mmap threshold)"
    if not mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        return f"glibc {version}, mmap {MMAP_THRESHOLD >> 20} MiB (mallopt refused the trim threshold)"
    return f"glibc {version}, freed memory kept (trim {TRIM_THRESHOLD >> 20} MiB, mmap {MMAP_THRESHOLD >> 20} MiB)"


def plural(n: int, noun: str) -> str:
    """ "1 seed", "3 seeds": a count as a command prints it."""
    return f"{n} {noun}" + ("" if n == 1 else "s")
