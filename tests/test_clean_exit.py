"""fairseq-train exits 0 after training stops mid-epoch: the plugin stops fairseq's background batch
thread at exit (:mod:`fairseq_pdd.clean_exit`), which otherwise dies in a torch call at interpreter
shutdown with ``terminate called without an active exception`` (SIGABRT)."""
import threading
import time

import torch
from cli_runner import train
from fairseq.data.iterators import BufferedIterator

from fairseq_pdd import clean_exit


class SlowBatches:
    """1000 batches, 10 ms each."""

    def __len__(self):
        return 1000

    def __iter__(self):
        for i in range(len(self)):
            time.sleep(0.01)
            yield torch.full((4,), i)


def test_stops_a_consumer_blocked_on_its_full_queue_and_one_building_a_batch():
    full, busy = BufferedIterator(2, list(range(100))), BufferedIterator(1000, SlowBatches())
    assert next(full) == 0 and next(busy).tolist() == [0] * 4
    time.sleep(0.1)  # the first consumer's queue is full, the second one is still producing
    assert full._queue.full() and not busy._queue.full()
    assert clean_exit.stop_background_consumers(timeout=10) == 2
    assert not full._consumer.is_alive() and not busy._consumer.is_alive()
    assert clean_exit.background_consumers() == [] and threading.active_count() >= 1


def test_training_stopped_mid_epoch_exits_cleanly(toy_mt, tmp_path):
    """1 update of 29 with a large batch buffer, no validation, no checkpoint: the process exits while the
    batch thread is still building batches. Without the exit hook this aborted in 5 of 5 runs."""
    proc = train(toy_mt.data, str(tmp_path), toy_mt.root,
                 ["--criterion", "cross_entropy", "--max-update", "1", "--data-buffer-size", "1000",
                  "--disable-validation", "--no-save"])  # cli_runner.run fails the test on any non-zero exit
    assert "done training" in proc.stdout + proc.stderr
