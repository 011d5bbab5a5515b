"""Blocking wrappers: ``SyncProducer`` and ``SyncPredictor`` for code without an event loop.

Each runs its asynchronous twin on an event loop in a daemon thread it owns (one
thread per wrapper). ``SyncProducer.send`` blocks while the producer is full and
returns a ``concurrent.futures.Future[Delivery]``; ``close`` (or leaving the ``with``
block) flushes, then stops the thread. Leaving the block on ``KeyboardInterrupt``
(Ctrl-C) closes without flushing, as ``async with Producer`` does on a cancellation:
every record without a report fails with ``ProducerClosed`` at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

from mlgate_client.delivery import Delivery
from mlgate_client.errors import ClientClosed, PredictorClosed, ProducerClosed
from mlgate_client.predictor import BatchPrediction, Prediction, Predictor
from mlgate_client.producer import Producer, ProducerStats
from mlgate_client.records import Features, Metadata, Timestamp

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread; ``run`` submits a coroutine and waits.

    ``stop`` first cancels what still runs there and lets it finish (as ``asyncio.run``
    does): a ``close`` interrupted in the calling thread (Ctrl-C) then ends as a close
    cut short, each record failed with ``ProducerClosed``, rather than left pending on
    a closed loop. A ``run`` racing ``stop`` from another thread gets ``closed`` (the
    owner's ``ProducerClosed`` or ``PredictorClosed``),
    never a wait on a loop that will not run it."""

    def __init__(self, name: str, closed: type[ClientClosed] = ProducerClosed) -> None:
        self._closed = closed  # what a call after ``stop`` raises
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._lock = threading.Lock()
        self._stopping = False
        self._thread.start()

    @property
    def stopped(self) -> bool:
        return self._stopping

    def check_caller(self) -> None:
        """A call from the loop's own thread (an ``on_delivery`` callback sending again,
        or closing) would wait on the loop it blocks, for ever (a review)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "called from the client's own thread (an on_delivery callback): it would "
                "wait for ever; hand the work to another thread"
            )

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        try:
            self.check_caller()
        except RuntimeError:
            coroutine.close()
            raise
        with self._lock:
            if self._stopping:
                coroutine.close()  # never awaited: say nothing about it
                raise self._closed("closed: its event loop has stopped")
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError:
            raise self._closed("closed while this call ran") from None

    def stop(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        try:
            asyncio.run_coroutine_threadsafe(_cancel_the_rest(), self._loop).result(STOP_WAIT_S)
        except BaseException:  # interrupted, or the rest would not end: stop anyway
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


STOP_WAIT_S = 10.0


async def _cancel_the_rest() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _chain(source: asyncio.Future[Delivery]) -> concurrent.futures.Future[Delivery]:
    target: concurrent.futures.Future[Delivery] = concurrent.futures.Future()

    def copy(done: asyncio.Future[Delivery]) -> None:
        if done.cancelled():
            target.cancel()
        elif (error := done.exception()) is not None:
            target.set_exception(error)
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)
    return target


class SyncProducer:
    """``Producer`` for threads: same options, blocking methods."""

    def __init__(self, url: str, source: str, **options: Any) -> None:
        self._thread = LoopThread("mlgate-producer")

        async def make() -> Producer:
            return Producer(url, source, **options)

        try:
            self._producer = self._thread.run(make())
        except BaseException:  # bad options: no thread left running
            self._thread.stop()
            raise

    @property
    def stats(self) -> ProducerStats:
        return self._producer.stats

    def send(
        self,
        features: Features,
        *,
        label: float | None = None,
        metadata: Metadata | None = None,
        timestamp: Timestamp | None = None,
        record_id: str | None = None,
    ) -> concurrent.futures.Future[Delivery]:
        async def send() -> concurrent.futures.Future[Delivery]:
            future = await self._producer.send(
                features, label=label, metadata=metadata, timestamp=timestamp, record_id=record_id
            )
            return _chain(future)

        return self._thread.run(send())

    def flush(self, timeout: float | None = None) -> None:
        self._thread.run(self._producer.flush(timeout))

    def close(self, timeout: float | None = None) -> None:
        """Flush (at most ``timeout``; see ``Producer.close``), then stop. Idempotent."""
        if self._thread.stopped:
            return
        self._thread.check_caller()
        try:
            self._thread.run(self._producer.close(timeout))
        finally:
            self._thread.stop()

    def __enter__(self) -> SyncProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Ctrl-C: the caller stops now, not after the retries' budget. Any other way
        # out flushes, ``sys.exit`` and a generator closed early included (a review).
        cut_short = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.close(0 if cut_short else None)


class SyncPredictor:
    """``Predictor`` for threads: same options, blocking methods."""

    def __init__(self, url: str, **options: Any) -> None:
        self._thread = LoopThread("mlgate-predictor", PredictorClosed)

        async def make() -> Predictor:
            return Predictor(url, **options)

        try:
            self._predictor = self._thread.run(make())
        except BaseException:
            self._thread.stop()
            raise

    def predict(self, features: Features, **options: Any) -> Prediction:
        return self._thread.run(self._predictor.predict(features, **options))

    def predict_many(self, instances: Sequence[Features] | Any, **options: Any) -> BatchPrediction:
        return self._thread.run(self._predictor.predict_many(instances, **options))

    def close(self) -> None:
        if self._thread.stopped:
            return
        try:
            self._thread.run(self._predictor.close())
        finally:
            self._thread.stop()

    def __enter__(self) -> SyncPredictor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
