"""A run's files in its artifact store: checkpoints pinned before their upload (the engine may
replace them meanwhile), hard-linked where the artifacts are files on this machine, and small
texts (config.json, environment.txt)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow.tracking import MlflowClient

CHECKPOINTS = "checkpoints"  # the run's latest last.pt and best.pt: its final weights, or where to resume


def _pin(path: Path) -> Path:
    """The file as it is now, under its own name in a new folder beside it (a hard link, else a
    copy): the engine may replace `path` with a newer checkpoint before the upload reads it."""
    folder = Path(tempfile.mkdtemp(prefix=".upload-", dir=path.parent))
    pinned = folder / path.name
    try:
        os.link(path, pinned)
    except OSError:  # a file system without hard links
        shutil.copy2(path, pinned)
    return pinned


def drop_pinned(folder: Path) -> None:
    """Remove the files `_pin` made for uploads that will not happen (their writer was abandoned,
    or their process killed): they hold old checkpoints."""
    for pinned in Path(folder).glob(".upload-*"):
        shutil.rmtree(pinned, ignore_errors=True)


def _log_pinned(client: MlflowClient, run_id: str, pinned: Path, artifact_path: str) -> None:
    try:
        if not _link_artifact(client, run_id, pinned, artifact_path):
            client.log_artifact(run_id, str(pinned), artifact_path=artifact_path)
    finally:
        shutil.rmtree(pinned.parent, ignore_errors=True)


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder of a run's artifacts when they are files on this machine (a path, or a file:
    URI without a remote host); None for any other store (a tracking server's proxy, S3, ...)."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a path (C:\... on Windows)
        return Path(artifact_uri)
    return None


def _link_artifact(client: MlflowClient, run_id: str, file: Path, artifact_path: str) -> bool:
    """Where the run's artifacts are files on this machine, `file` hard-linked into them in place
    of the old one: the same bytes, not a second copy of them (checkpoints run to hundreds of MB,
    and the engine only ever replaces its files, never rewrites them). False where the artifacts
    are elsewhere or no link can be made (another file system): then MLflow copies the file."""
    folder = local_artifact_dir(client.get_run(run_id).info.artifact_uri)
    if folder is None:
        return False
    dest = folder / artifact_path / file.name
    tmp = dest.with_name(f".{dest.name}.link")  # one trainer per run: one link made at a time
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a process killed between the link and the rename
        os.link(file, tmp)
    except OSError:
        return False
    os.replace(tmp, dest)
    return True


def _log_text(client: MlflowClient, run_id: str, text: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        client.log_artifact(run_id, str(path))
