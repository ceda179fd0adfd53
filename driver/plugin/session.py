"""Serialized access to the checkpoint, in this process and across plugin instances sharing the plugin
directory (a rolling update), for one batch of the plugin's work (:mod:`driver.plugin.groupcommit`).

A session takes the process's lock, then the ``serialize.lock`` file lock (the lock file stays open for
the plugin's lifetime; waiting for another instance gives up after 30 s), checks the plugin and CDI
directories (until that first succeeds, every session does, and answers the error meanwhile: never a
crash loop), reads the checkpoint and lets ``finish`` complete what a crash or a failed write
interrupted, before it yields the checkpoint — or the error that makes it unusable (logged; the file is
left untouched). Sessions run in the group commit's worker thread, so they block.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from driver.plugin import cdi, durable
from driver.plugin.checkpoint import Checkpoint, CheckpointError, CheckpointStore

log = logging.getLogger(__name__)

LOCK_WAIT = 30.0


class Sessions:
    def __init__(self, store: CheckpointStore, plugin_dir: Path, cdi_root: Path,
                 finish: Callable[[Checkpoint], list[str]]):
        self.store = store
        self.plugin_dir = plugin_dir
        self.cdi_root = cdi_root
        self._finish = finish
        self._lock = threading.Lock()
        self._lock_file: Any = None
        self._dirs_ready = False
        #: the interrupted claims the last session finished (UIDs)
        self.finished: list[str] = []

    def _ensure_dirs(self) -> None:
        if self._dirs_ready:
            return
        self.store.ensure_dir()
        try:
            cdi.ensure_dir(self.cdi_root)
        except durable.DurableError as e:
            raise CheckpointError(f"{e.strerror}; the plugin prepares nothing until then") from None
        self._dirs_ready = True

    def _open_lock_file(self) -> None:
        if self._lock_file is not None:
            return
        path = self.plugin_dir / "serialize.lock"
        try:     # never through a link planted at the path
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise CheckpointError(f"cannot open the lock file {path}: {e.strerror}; remove whatever is at that "
                                  "path (a link?) and make the plugin directory writable") from None
        self._lock_file = os.fdopen(fd, "a+")

    def _acquire(self) -> None:
        """The file lock that excludes a second plugin instance sharing the plugin directory."""
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CheckpointError(f"another plugin instance holds {self.plugin_dir / 'serialize.lock'} "
                                          f"for more than {LOCK_WAIT:.0f}s; retrying later") from None
                time.sleep(0.01)

    @contextlib.contextmanager
    def open(self) -> Iterator[Checkpoint | CheckpointError]:
        with self._lock:
            self.finished = []
            try:
                self._ensure_dirs()
                self._open_lock_file()
                self._acquire()
            except CheckpointError as e:
                log.error("%s", e)
                yield e
                return
            try:
                cp: Checkpoint | CheckpointError
                try:
                    cp = self.store.read()
                    self.finished = self._finish(cp)
                except CheckpointError as e:
                    log.error("%s", e)
                    cp = e
                except Exception as e:  # noqa: BLE001 - a bug here must not crash-loop the plugin
                    log.exception("finishing interrupted work failed")
                    cp = CheckpointError(f"finishing the interrupted prepares and unprepares recorded in "
                                         f"{self.store.path} failed: internal error: {e}; see the plugin log")
                yield cp
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
