"""A cache entry is computed once by processes that share the cache, however many ask at once."""

import threading
import time

from common.storage import atomic_write, filling


def test_concurrent_fills_of_one_entry_compute_it_once(tmp_path):
    entry, computed = tmp_path / "teacher.bin", []
    start = threading.Barrier(4)

    def fill() -> None:
        start.wait()
        with filling(entry):
            if not entry.exists():
                computed.append(threading.get_ident())
                time.sleep(0.2)  # a teacher being fitted: without the lock every thread would be here now
                atomic_write(entry, b"weights")

    threads = [threading.Thread(target=fill) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(computed) == 1 and entry.read_bytes() == b"weights"


def test_fills_of_different_entries_do_not_wait_for_each_other(tmp_path):
    with filling(tmp_path / "a.bin"):
        with filling(tmp_path / "b.bin"):  # would deadlock if entries shared one lock
            atomic_write(tmp_path / "b.bin", b"b")
    assert (tmp_path / "b.bin").read_bytes() == b"b"
