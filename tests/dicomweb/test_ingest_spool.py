"""The spool every ingest channel writes through (`dicomweb.ingest.spool`): the size limit, the free-space
watermark and unreadable sources end as an `InstanceRejected` with the Store Instances failure reason, and no
spool file is left behind; stale spool files are swept. Plain files in a temporary folder."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomweb.ingest.reasons import OUT_OF_RESOURCES, PROCESSING_FAILURE, InstanceRejected
from dicomweb.ingest.spool import Spooler, sweep
from server.platform.diskspace import FreeSpace


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_every_way_in_spools_the_same_bytes_and_hash(tmp_path: Path) -> None:
    spooler = Spooler(tmp_path / "spool", 1 << 20)
    data = os.urandom(200_000)
    source = tmp_path / "file.dcm"
    source.write_bytes(data)
    stream = spooler.open()
    for i in range(0, len(data), 65536):
        stream.write(data[i : i + 65536])
    spooled = [spooler.write(data), spooler.copy(source), stream.finish()]
    expected = hashlib.sha256(data).hexdigest()
    for item in spooled:
        assert (item.size, item.sha256, item.path.read_bytes()) == (len(data), expected, data)
        assert item.path.parent == tmp_path / "spool" and item.path.suffix == ".part"


def test_an_instance_over_the_limit_is_out_of_resources_on_every_way_in(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    spooler = Spooler(folder, 1000)
    source = tmp_path / "big.dcm"
    source.write_bytes(b"x" * 1001)
    stream = spooler.open()
    stream.write(b"x" * 600)
    stream.write(b"x" * 401)
    attempts: list[Callable[[], object]] = [lambda: spooler.write(b"x" * 1001), lambda: spooler.copy(source)]
    for attempt in [*attempts, stream.finish]:
        with pytest.raises(InstanceRejected) as caught:
            attempt()
        assert caught.value.reason == OUT_OF_RESOURCES
        assert caught.value.comment == "instance larger than the limit of 1000 bytes"
    assert _left(folder) == []


def test_below_the_watermark_nothing_is_spooled(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    folder.mkdir()
    spooler = Spooler(folder, 1 << 20, FreeSpace([("spool", folder)], min_bytes=1 << 62))
    attempts: list[Callable[[], object]] = [lambda: spooler.write(b"data"), lambda: spooler.open().finish()]
    for attempt in attempts:
        with pytest.raises(InstanceRejected) as caught:
            attempt()
        assert caught.value.reason == OUT_OF_RESOURCES and "out of resources" in caught.value.comment
    assert _left(folder) == []


def test_an_unreadable_source_is_a_processing_failure(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    spooler = Spooler(folder, 1 << 20)
    for source in (tmp_path / "missing.dcm", tmp_path):  # absent; a folder (EISDIR when read)
        with pytest.raises(InstanceRejected) as caught:
            spooler.copy(source)
        assert caught.value.reason == PROCESSING_FAILURE and caught.value.comment.startswith("cannot read the file")
    assert _left(folder) == []


def test_sweep_removes_stale_spool_files_only(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    folder.mkdir()
    old, fresh, other = folder / "a.part", folder / "b.part", folder / "c.keep"
    for path in (old, fresh, other):
        path.write_bytes(b"x")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    assert sweep(folder, 600) == 1
    assert _left(folder) == ["b.part", "c.keep"]
    assert sweep(tmp_path / "absent", 600) == 0
