"""Stop fairseq's background batch threads before the interpreter exits (fairseq glue).

fairseq's ``BufferedIterator`` (``--data-buffer-size``, default 10) fills its queue of batches from a
daemon thread, ``fairseq.data.iterators.BackgroundConsumer``. When training stops before the end of
an epoch (``--max-update``, ``--stop-time-hours``, an error), that thread may still be building a
batch inside a torch call that released the GIL. At interpreter exit CPython ends a daemon thread
with ``pthread_exit`` when it takes the GIL back; the forced unwind passes through pybind11's
``gil_scoped_release`` destructor, which is ``noexcept``, so libstdc++ calls ``std::terminate``:
``terminate called without an active exception`` and SIGABRT (exit status 134) after a complete
run, which breaks any script that checks the exit status.

:func:`install` (called by :func:`fairseq_pdd.register`, so in every fairseq tool run with the
plugin) registers an ``atexit`` hook, which CPython runs after joining the non-daemon threads and
before it stops the daemon ones: every live consumer is told to stop after the batch it is building,
and its queue is emptied until it has ended.
"""
import atexit
import logging
import queue
import threading
import time

logger = logging.getLogger(__name__)

_installed = False


def background_consumers() -> list:
    """The live ``BackgroundConsumer`` threads of fairseq's buffered batch iterators."""
    from fairseq.data.iterators import BackgroundConsumer

    return [t for t in threading.enumerate() if isinstance(t, BackgroundConsumer) and t.is_alive()]


def stop_background_consumers(timeout: float = 60.0) -> int:
    """Stop every live consumer thread (within ``timeout`` seconds in all); returns how many were live."""
    consumers = background_consumers()
    for consumer in consumers:
        consumer._max_len = 0  # its loop ends after the next put: count >= 0
    deadline = time.monotonic() + timeout
    for consumer in consumers:
        while consumer.is_alive() and time.monotonic() < deadline:
            _drain(consumer._queue)  # a put blocked on the full queue returns
            consumer.join(0.01)
        if consumer.is_alive():
            logger.warning("fairseq's batch thread %s did not stop within %.0f s; the exit may abort",
                           consumer.name, timeout)
    return len(consumers)


def _drain(items: queue.Queue) -> None:
    try:
        while True:
            items.get_nowait()
    except queue.Empty:
        pass


def install() -> None:
    """Register :func:`stop_background_consumers` to run at interpreter exit (idempotent)."""
    global _installed
    if not _installed:
        atexit.register(stop_background_consumers)
        _installed = True
