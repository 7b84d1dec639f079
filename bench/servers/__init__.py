"""bench.servers."""

from bench.servers import checks, retry, urls  # noqa: F401
