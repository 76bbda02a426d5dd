"""The spool: where received instances live, and how they get there durably.

Layout under the spool folder:
    incoming/                          transfers in progress (temporary names)
    studies/<study>/<series>/<sop>.dcm  kept instances, each as received
    quarantine/<study>/<series>/<sop>.dcm  files found without a row that cannot be read
    results/<study>/<series>/<sop>.dcm     results made from them

A file appears under studies/ only whole: it is written under incoming/,
fsync'd, renamed into place (atomic on one file system) and its folder fsync'd.
Retention (retention.py chooses the studies) removes the files of finished
studies here, each under the lock its instance is kept under.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("machaon.spool")

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SpoolError(Exception):
    pass


def valid_uid(value: object) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (also keeps paths safe)."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


class Spool:
    def __init__(self, root: Path, min_free_mb: int = 0):
        self.root = Path(root).absolute()
        self.incoming = self.root / "incoming"
        self.studies = self.root / "studies"
        self.quarantined = self.root / "quarantine"
        self.results = self.root / "results"
        self.min_free_bytes = min_free_mb * 1024 * 1024
        # Keeping a copy of one SOP Instance (its rename and its row) and removing its file must
        # not interleave; striped locks keep that cheap.
        self._instance_locks = [threading.Lock() for _ in range(64)]

    def prepare(self) -> None:
        """Create the folders and prove we can write durably there."""
        try:
            _make_dirs_durably(self.incoming)
            _make_dirs_durably(self.studies)
            probe = self.incoming / f".probe-{os.getpid()}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"machaon")
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as exc:
            raise SpoolError(f"{self.root} is not writable: {exc.strerror or exc}") from None

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_room(self) -> bool:
        return self.free_bytes() >= self.min_free_bytes

    @staticmethod
    def relative_path(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        return f"studies/{study_uid}/{series_uid}/{sop_instance_uid}.dcm"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def keep(self, temporary: Path, relative: str) -> int:
        """Durably move a fully received file to its final name; returns its size.
        An older copy under the same name is replaced atomically."""
        final = self.root / relative
        _make_dirs_durably(final.parent)
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        try:
            os.replace(temporary, final)
        except FileNotFoundError:
            if not temporary.exists():
                raise
            _make_dirs_durably(final.parent)  # retention removed the emptied folder meanwhile
            os.replace(temporary, final)
        _fsync_dir(final.parent)
        return size

    @staticmethod
    def result_path(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        return f"results/{study_uid}/{series_uid}/{sop_instance_uid}.dcm"

    def write(self, ds, relative: str) -> int:
        """Durably write a dataset we made (a result) under `relative`; returns its size."""
        fd, temporary = tempfile.mkstemp(dir=self.incoming, suffix=".dcm")
        os.close(fd)
        try:
            ds.save_as(temporary, enforce_file_format=True)
            return self.keep(Path(temporary), relative)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def remove(self, relative: str) -> None:
        """Best effort: a copy that cannot be removed is logged, not raised."""
        try:
            (self.root / relative).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove the replaced copy %s: %s", relative, exc.strerror)

    def instance_lock(self, sop_instance_uid: str) -> threading.Lock:
        """Held while a copy of the instance is kept and recorded, and while retention removes it."""
        return self._instance_locks[zlib.crc32(sop_instance_uid.encode()) % len(self._instance_locks)]

    def remove_kept(self, relative: str) -> int:
        """Remove a file of a study retention let go; returns its size (0 if it was gone)."""
        path = self.root / relative
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        except OSError as exc:  # it stays; the others go on
            log.warning("could not remove %s: %s", relative, exc.strerror)
            return 0
        return size

    def remove_empty_folders(self, study_uid: str) -> None:
        """Remove the study's folders under studies/ and results/ that retention left empty
        (deepest first); a folder a new file went into meanwhile stays."""
        for top in (self.studies / study_uid, self.results / study_uid):
            if not top.is_dir():
                continue
            for folder, _, _ in sorted(os.walk(top), key=lambda entry: -len(Path(entry[0]).parts)):
                try:
                    os.rmdir(folder)
                except FileNotFoundError:
                    pass
                except OSError as exc:  # not empty (a new file), or not ours to remove: it stays
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        log.warning("could not remove the folder %s: %s", folder, exc.strerror)
            _fsync_dir(top.parent)

    def study_files(self) -> Iterator[tuple[str, list[str]]]:
        """(study folder name, relative paths of its files) for each study folder in the spool."""
        for study in sorted(self.studies.iterdir()):
            if study.is_dir():
                try:
                    files = sorted(str(p.relative_to(self.root)) for p in study.rglob("*") if p.is_file())
                except FileNotFoundError:  # retention removed its folders meanwhile
                    continue
                yield study.name, files

    def quarantine(self, relative: str) -> str:
        """Move a kept file out of studies/ into quarantine/, keeping its place below; returns
        the new relative path. Nothing is deleted: an operator decides what becomes of it."""
        source = self.root / relative
        target = self.quarantined / Path(relative).relative_to("studies")
        _make_dirs_durably(target.parent)
        copies = 1
        while target.exists():  # quarantined before under the same name: keep both
            target = target.with_name(f"{Path(relative).name}.{copies}")
            copies += 1
        os.replace(source, target)
        _fsync_dir(target.parent)
        _fsync_dir(source.parent)
        return str(target.relative_to(self.root))

    def sweep_incoming(self, untouched_for_s: float) -> int:
        """Delete transfers that never finished (a sender that dropped the
        association, or a crash). Nothing under incoming/ was acknowledged."""
        cutoff = time.time() - untouched_for_s
        removed = 0
        for entry in self.incoming.iterdir():
            try:
                if entry.is_file() and entry.stat().st_mtime <= cutoff:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("removed %d unfinished transfer(s) from %s", removed, self.incoming)
        return removed


def copy_durably(source: Path, target: Path) -> None:
    """Copy a file so that `target` is either absent or whole and on disk, even after a crash."""
    _make_dirs_durably(target.parent)
    temporary = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, temporary)
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, target)
    _fsync_dir(target.parent)


def _make_dirs_durably(folder: Path) -> None:
    """mkdir -p, fsyncing each parent whose entry list changed."""
    if folder.is_dir():
        return
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            pass  # another association made it at the same moment: sync it all the same
        _fsync_dir(new.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
