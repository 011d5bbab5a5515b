"""InferenceWorker: the batching actor in front of one loaded (model, version).

Requests put ``(inputs, deadline, future)`` items in one bounded mailbox, bounded in
requests waiting and in the bytes requests hold until answered (their inputs, and what
the caller says it holds besides); a full mailbox raises ``MailboxFull`` at once, and
so does a request that, by the recent
batch run times and the rows queued ahead of it, would be answered after its
deadline (shed now rather than answered 504 later). The single worker task takes the first item,
then, when the model is idle, only the items already queued (a lone request waits
for nobody: what arrives while it computes forms the next batch); while a batch
computes, it keeps filling the next until it holds ``max_batch_size`` rows or
``max_queue_delay`` has passed since its first item was queued (``time.monotonic``;
as Triton's dynamic batcher counts it: rows that already waited out the delay while
the previous batch computed go at once, so the model does not idle), the wait
clamped so the nearest item deadline can still be met given the recent run time.
Items whose deadline has passed are failed with ``DeadlineExpired`` and never
computed. The rows of the rest are stacked with ``np.concatenate``, one
``InferenceSession.run`` computes them in a thread the worker owns (onnxruntime
releases the GIL), and the outputs are sliced back to each item by row offsets, so
rows never mix between requests.

Up to two batches are with the thread at once: the one computing and the next,
formed while it computes (filled until it should end), so the model goes from one
batch to the next without waiting for the event loop, however busy the loop is. The
waiting batch still counts against the mailbox bound, and a batch whose every
deadline passed while it waited is not computed.

The thread runs ``thread_niceness`` nicer than the process: on the one core the
model shares with the event loop, the loop (answering, admitting, refusing) goes
first whenever it has work, in short bursts, and the model computes in the rest.

A batch's answers go out at once, except while the worker refuses requests (an
overload): then ``ANSWER_CHUNK`` a turn of the event loop, so that requests arriving
meanwhile are read, and refused, without waiting for the whole batch to be answered;
refusals come first there, the batch's shape second.

A batch whose run fails is run again item by item, once, so that one request's input
the model cannot compute (an index out of a Gather's range) fails that request only,
not those batched with it; an input onnxruntime refuses as ``INVALID_ARGUMENT`` fails
with ``InputRefused`` (the client's fault, not the model's). A request failing alone
with any other error (onnxruntime's ``FAIL`` or ``RUNTIME_EXCEPTION``, which a
model's own ops raise for values they cannot take too) is tried once more (unless it
already failed in a batch, then alone): answered if it now computes. Failing again,
it is the input's fault (``InputRefused``, which the model's breaker does not count:
one tenant's bad rows must not open it for everyone) only when the model is known to
work: it has not shown itself unreliable within ``UNRELIABLE_S`` (an input that
failed and then computed, a known-good feed that failed), and computes its known-good
feed now: a row of a request it answered (taken at most every ``KNOWN_GOOD_EVERY_S``),
which counts while the model answered a request within ``TRAFFIC_VOUCHES_S``, or, for a
model with none (one that has answered nothing, or runs each request alone), its
load's warm-up, which counts only within ``SERVED_WITHIN_S``; a success holds for
``KNOWN_GOOD_HOLDS_S``. Otherwise the model is at fault: the request fails with its
own error, which the breaker counts. So a model failing at random soon counts every
failure, and one failing on all real values (not on the warm-up's zeros) never
answered, so its failures count (reviews: a rule by time alone answered a flaky
model's failures 422; the zeros alone blamed clients for a model broken on any
non-zero value).

Between tenants (``submit``'s ``tenant``; None where there are no keys): each tenant's
requests queue in a lane of its own (requests of no tenant in ``SHARED_LANE``), and
batches are formed from the lanes in turn (``LaneMailbox``), each turn taking a
tenant's requests while their rows fit in a batch (one request at least). A tenant's
row waits for one turn of each other tenant at most, not for everything a flooding
tenant queued before it (a review: one tenant's 256-row requests, within its rate
limit, took another's single-row p50 from 2.7 ms to 60-70 ms), and the rows of many
tenants of a row or two still fill one batch. Its admission counts only what would
run before it: its lane's turns up to it and as many turns of each other lane, not
their whole queue, which would shed it for their flood. A tenant's requests hold at
most ``TENANT_SHARE`` of the mailbox, in requests (queued, or handed to the thread
behind the batch computing) and in bytes: the rest is kept for the others.

An item larger than ``max_batch_size`` rows runs as a batch of its own; an item that
does not fit the current batch opens the next one. A model without a free batch
dimension (``shares_batches`` False) runs each item alone; so does, from then on, a
model whose outputs in a shared run turn out not to have one row per input row (its
items run again alone: no request gets rows of another).
"""

from __future__ import annotations

import asyncio
import math
import operator
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from mlgate.workers.actor import Actor
from mlgate.workers.errors import DeadlineExpired, InputRefused, MailboxFull, ShutDown, WorkerClosed
from mlgate.workers.lanes import SHARED_LANE, LaneMailbox
from mlgate.workers.telemetry import NO_TELEMETRY, WorkerTelemetry

log = structlog.get_logger("mlgate.inference")

Outputs = dict[str, np.ndarray]
# Weight of the newest run in the running estimate of a batch's compute time.
_RUN_TIME_WEIGHT = 0.2
# Answers delivered per turn of the event loop while the worker refuses requests
# (``_deliver``).
ANSWER_CHUNK = 2
# For how many of its batches' times an idle model's run-time estimate holds before
# room is made to measure it again (``InferenceWorker._estimate_is_stale``).
ESTIMATE_STALE_BATCHES = 4
# The least time between two sweeps of the deadline watch (``_watch_deadlines``): a
# request is answered 504 at most this long past its deadline.
WATCH_GAP_S = 0.02
# A failing input is the client's on the warm-up's word only if the model answered a
# request this recently...
SERVED_WITHIN_S = 60.0
# ...or, on the word of a row of real traffic it answered, this recently...
TRAFFIC_VOUCHES_S = 600.0
# ...and has not failed of itself within this long (``_checked_run``).
UNRELIABLE_S = 60.0
# A success of the known-good feed stands for this long, for the failures that follow
# (a batch of bad inputs run alone: one check, not one each).
KNOWN_GOOD_HOLDS_S = 0.1
# The known-good feed takes a row of an answered request at most this often.
KNOWN_GOOD_EVERY_S = 1.0
# The most of the mailbox, in requests and in the bytes they hold, one tenant's
# queued requests may take.
TENANT_SHARE = 0.75
# The most lanes (tenants with requests queued) the admission estimate counts one by
# one (``_batches_ahead``); with more it counts the whole queue, so a request's
# admission passes over 64 lanes at most.
LANES_COUNTED = 64
# onnxruntime's errors begin ``[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ``.
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


def _lower_priority(niceness: int) -> Callable[[], None]:
    """A thread initializer that makes the calling thread ``niceness`` nicer than the
    process (Linux schedules threads one by one). onnxruntime's own extra intra-op
    threads (``inference_threads`` > 1) keep the process's niceness."""

    def lower() -> None:
        thread = threading.get_native_id()
        try:
            os.setpriority(
                os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + niceness)
            )
        except OSError as exc:  # not Linux, or a sandbox that forbids it: run as is
            log.warning("inference_thread_priority_unchanged", error=repr(exc))

    return lower


class Session(Protocol):
    """What the worker needs of an ``onnxruntime.InferenceSession``."""

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: Mapping[str, np.ndarray],
        run_options: RunOptions | None = None,
    ) -> Sequence[np.ndarray]: ...


class RunOptions(Protocol):
    """What the worker needs of an ``onnxruntime.RunOptions``: setting ``terminate``
    ends the runs using it (they fail), checked between the graph's nodes; each run's
    own options keep the given ones' ``log_severity_level``."""

    terminate: bool
    log_severity_level: int


@dataclass(eq=False, slots=True)
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    deadline: float
    enqueued: float
    nbytes: int
    future: asyncio.Future[Outputs]
    # Context crosses the queue explicitly: contextvars do not reach the worker task.
    request_id: str | None
    # Items batch together only when their inputs agree beyond the batch dimension.
    signature: tuple[tuple[str, tuple[int, ...], str], ...]
    # Its bytes no longer count as waiting (``_settled``): once only, whichever of a
    # crash's clean-up and its run's end comes first.
    settled: bool = False
    # It failed alone and was checked (``_checked_run``).
    checked: bool = False
    # It failed in a batch, then ran alone: it needs no second try of its own.
    failed_in_batch: bool = False
    tenant: str | None = None
    # ``LaneMailbox``'s: the tenant's own, or ``SHARED_LANE`` for a request of no tenant.
    lane: str = SHARED_LANE


@dataclass(slots=True)
class _TenantShare:
    """What one tenant's requests hold of a worker: requests queued (until taken from
    the mailbox) and waiting in the thread (its share's bound, as ``mailbox_depth``
    counts them); requests and bytes not answered yet. Its rows queued are its lane's
    (``_lane_rows``)."""

    requests: int = 0
    unanswered: int = 0
    nbytes: int = 0
    waiting: int = 0  # requests in a batch handed to the thread behind the one computing


class _InputAtFault(Exception):
    """In the thread: the item failed twice while the model's known-good feed computes."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(slots=True)
class _Run:
    options: RunOptions | None  # this run's own: ``terminate`` ends it alone
    handed_at: float  # to the thread (``time.monotonic``)
    # It took one of the worker's two slots (a request run again alone takes none).
    holds_slot: bool = True
    # When the thread began computing it (set there; read once its future is done,
    # or, for the overrun, as it stands: a float written whole).
    started_at: float | None = None
    input_s: float = 0.0  # gathering the batch's inputs into one feed


def request_rows(feed: Mapping[str, np.ndarray]) -> int:
    """A request's rows: its inputs' common first dimension, else 1 (inputs without one,
    which only a model running each request alone takes)."""
    firsts = {array.shape[0] if array.ndim else None for array in feed.values()}
    first = firsts.pop() if len(firsts) == 1 else None
    return 1 if first is None else int(first)


def _end(options: Iterable[RunOptions | None]) -> None:
    """End the runs given these options (they fail, between the graph's nodes)."""
    for each in options:
        if each is not None:
            each.terminate = True


@dataclass(slots=True)
class Duration:
    """How many, and their time in all (ns): a statistic of Triton's statistics extension."""

    count: int = 0
    ns: int = 0

    def add(self, count: int, seconds: float) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass(slots=True)
class BatchStats:
    """The runs of one batch size (in rows): gathering their inputs, computing, and
    splitting their outputs."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class WorkerStats:
    """Counts of the worker's life, and the request statistics Triton's statistics
    extension reports: per request, its time in all (``success``: queued to answered;
    ``fail``: queued to its run's failure), queued, and its batch's input gathering,
    run and output split (as Triton counts them, each request of a batch the whole
    batch's time); per batch size, the same per run."""

    batches: int = 0
    rows_computed: int = 0
    expired: int = 0
    rejected: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    by_batch_size: dict[int, BatchStats] = field(default_factory=dict)
    last_inference_ms: int = 0  # wall clock, ms since the epoch; 0 before the first


class InferenceWorker(Actor[_Item]):
    """Actor: one task, one bounded mailbox, one thread running the session."""

    def __init__(
        self,
        session: Session,
        *,
        input_names: Sequence[str],
        output_names: Sequence[str],
        model: str = "model",
        version: str = "1",
        max_batch_size: int = 64,
        max_queue_delay_s: float = 0.002,
        mailbox_size: int = 256,
        mailbox_bytes: int = 128 * 1024 * 1024,
        thread_niceness: int = 0,
        telemetry: WorkerTelemetry = NO_TELEMETRY,
        shares_batches: bool = True,
        run_options: RunOptions | None = None,
        known_good: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """``shares_batches``: False for a model whose outputs do not keep the input's
        rows (``model_config.open_session``): each request then runs alone, since its
        outputs could not be told apart by rows (a request of 0 rows would otherwise
        fit beside one of 1 within ``max_batch_size`` 1, and both get the same
        outputs). ``known_good``: a feed the model computed at its load, run to tell a
        failing input from a failing model."""
        if not input_names:
            raise ValueError("a model needs at least one input")
        # A fresh one of its kind is given to each run, so that a run can be ended on
        # its own: when nobody waits for it any more (``_watch_deadlines``), or closing.
        self._run_options = run_options
        self._known_good = known_good
        # ``time.monotonic()``: the last request answered; until when the model counts
        # as failing of itself; when its known-good feed last computed and last took a
        # row (the first two written in the thread too: floats, written whole).
        self._served_at = -math.inf
        self._unreliable_until = -math.inf
        self._known_good_ok_at = -math.inf
        self._known_good_taken_at = -math.inf
        self._known_good_is_traffic = False  # a row of a request it answered, not the warm-up
        super().__init__(mailbox_size, mailbox=LaneMailbox, telemetry=telemetry)
        self._mailbox: LaneMailbox[_Item]
        # A tenant's turn is a batch of rows at most (a review: a request a turn ran
        # light tenants' rows a batch each). Tenants' lanes may fill the mailbox: what
        # one tenant holds is bounded by its share (``TENANT_SHARE``).
        self._mailbox.take_turns_of(max(1, max_batch_size), operator.attrgetter("rows"))
        self._mailbox.share_own_lanes(1.0)
        self._mailbox_size = mailbox_size
        self._mailbox_bytes = mailbox_bytes
        self._tenant_requests = max(1, int(mailbox_size * TENANT_SHARE))
        self._tenant_bytes = int(mailbox_bytes * TENANT_SHARE)
        self._shares: dict[str, _TenantShare] = {}  # of the tenants holding any
        self._lane_rows: dict[str, int] = {}  # rows queued in each lane holding any
        self.model, self.version = model, version
        self.name = f"{model}/{version}"
        self._telemetry = telemetry
        self.stats = WorkerStats()
        self._session = session
        self._input_names = tuple(input_names)
        self._output_names = list(output_names)
        self._max_batch_size = max(1, max_batch_size)
        self._shares_batches = shares_batches
        self._max_queue_delay_s = max_queue_delay_s
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix=f"infer-{self.name}", initializer=_lower_priority(thread_niceness)
        )
        self._carry: _Item | None = None
        # Running estimate of one batch's compute time, a batch of at most
        # ``max_batch_size`` rows, from such batches only: an item larger than that
        # runs alone and leaves it be, or one large request would make an idle model
        # refuse every short deadline until the estimate faded (and scaling its time
        # down by rows would miss the fixed cost of a run, and admit what then expires).
        self._run_time_s = 0.0
        self._queued_rows = 0
        self._held_bytes = 0  # of the requests not answered yet, queued or computing
        self._slots = asyncio.Semaphore(2)
        self._in_flight: list[list[_Item]] = []  # batches handed to the thread
        # Each of those batches' run (by ``id`` of its item list): its options and
        # when it was handed to the thread.
        self._runs: dict[int, _Run] = {}
        # While a batch is with the thread: the timer that fails requests at their
        # deadline, computing or queued, and when it fires (``_watch_deadlines``).
        self._deadline_watch: asyncio.TimerHandle | None = None
        self._watch_at = math.inf
        # Options of runs that ended by themselves, for the next (a fresh one a run
        # costs onnxruntime a little more each time).
        self._spare_options: list[RunOptions] = []
        self._busy_until = 0.0  # when the thread should be free, by recent run times
        self._forming: list[_Item] = []  # the batch ``_take_batch`` fills, until handed over
        self._rejected_seen = 0  # ``stats.rejected`` when the last batch was answered
        self._last_ran_at = 0.0  # when the last batch's run ended (``time.monotonic``)

    def start(self) -> None:
        if self._task is None:
            self._launch()

    # Items handed to the thread behind the batch it is computing still count as
    # queued: the mailbox bound is what waits for the model, wherever it waits.
    @property
    def _waiting_in_thread(self) -> int:
        in_flight = self._in_flight  # at most two (``_slots``): asked thrice a request
        return sum(len(batch) for batch in in_flight[1:]) if len(in_flight) > 1 else 0

    @property
    def mailbox_depth(self) -> int:
        return self._mailbox.qsize() + self._waiting_in_thread

    @property
    def room(self) -> int:
        """Requests of a row each the mailbox would take now."""
        return max(0, self._mailbox_size - self.mailbox_depth)

    def room_within(self, seconds: float) -> int:
        """Requests of a row each the mailbox would take now and, by recent batch run
        times, answer within ``seconds``: ``check_room`` would refuse the next one."""
        if self._held_bytes >= self._mailbox_bytes or seconds <= 0:
            return 0
        if self._run_time_s <= 0:
            return self.room
        # A fifth of the time is left for the estimate's noise (and, for a caller that
        # does not count it itself, the way to the mailbox).
        batches = int(0.8 * seconds / self._run_time_s) - len(self._in_flight)
        if batches <= 0 and self._estimate_is_stale():
            batches = 1
        return max(0, min(self.room, batches * self._max_batch_size - self._queued_rows))

    def _estimate_is_stale(self) -> bool:
        """No batch computing, and none for ``ESTIMATE_STALE_BATCHES`` of the estimated
        batch times: the estimate is old and may no longer hold.

        It is wall time, measured while the event loop shared the core: after an
        overload it can be twice the model's time alone. A deadline it says is too
        short would then never get room, no batch would run, and the estimate would
        never be corrected (bench.overload: a retry storm of 50 ms deadlines right
        after one of 1 s got no answer at all, every request held and refused). So a
        stale estimate lets one batch in (``room_within``, ``check_room``), and that
        batch's run replaces it. A model truly too slow for the deadline answers that
        batch late, with time it had spare, and refuses the rest again."""
        since = time.monotonic() - self._last_ran_at
        return not self._in_flight and since >= ESTIMATE_STALE_BATCHES * self._run_time_s

    @property
    def mailbox_full(self) -> bool:
        return self.mailbox_depth >= self._mailbox_size

    def submit(
        self,
        inputs: np.ndarray | Mapping[str, np.ndarray],
        deadline: float,
        *,
        request_id: str | None = None,
        held_bytes: int = 0,
        tenant: str | None = None,
    ) -> asyncio.Future[Outputs]:
        """Queue rows (batch dimension first) for inference; the future holds this
        item's slice of every output. Raises ``MailboxFull`` at once when full.
        ``held_bytes``: what the request holds besides its inputs while it waits (the
        Python lists its rows were decoded into), counted against the byte bound.
        ``tenant``: whose request it is (None: nobody's share, the shared lane)."""
        if not self.running:
            raise WorkerClosed(f"inference worker {self.name} is not running")
        feed, count, signature = self._described(inputs)
        nbytes = sum(array.nbytes for array in feed.values()) + held_bytes
        now = self.check_room(count, deadline, nbytes=nbytes, tenant=tenant)
        future: asyncio.Future[Outputs] = self._new_future()
        item = _Item(feed, count, deadline, now, nbytes, future, request_id, signature)
        if tenant is not None:
            item.tenant = item.lane = tenant
        self._enqueue(item)
        self._queued_rows += count
        self._held_bytes += nbytes
        lane_rows = self._lane_rows
        lane_rows[item.lane] = lane_rows.get(item.lane, 0) + count
        if tenant is not None:
            share = self._shares.get(tenant)
            if share is None:
                share = self._shares[tenant] = _TenantShare()
            share.requests += 1
            share.unanswered += 1
            share.nbytes += nbytes
        if deadline < self._watch_at and self._in_flight:
            self._watch(deadline)
        return future

    def refuse_waiting(self, reason: str) -> int:
        """Take no more requests, and fail every one not answered yet, those computing
        included, with ``WorkerClosed(reason)``: for a shutdown whose wait for requests
        is ending, so each caller gets an answer (503, retry elsewhere) rather than a
        connection cut with nothing said. A run computing is ended (nobody waits for
        its answers), and ``close`` then has nothing left to drain. How many it failed."""
        self._closed = True
        error = ShutDown(reason)
        failed = self._fail_waiting(error)
        # Settled when their run ends (``_finished``), ended now.
        for batch in self._in_flight:
            for item in batch:
                failed += self._fail(item, error)
        _end(run.options for run in self._runs.values())
        return failed

    def _fail_waiting(self, error: BaseException) -> int:
        """Fail and settle every request not handed to the thread: queued, carried
        over, or in the batch forming. How many it failed."""
        waiting = []
        while not self._mailbox.empty():
            waiting.append(self._took(self._mailbox.get_nowait()))
        if self._carry is not None:
            waiting.append(self._carry)
            self._carry = None
        # In place: ``_take_batch`` fills this very list, and finds it empty.
        waiting += self._forming
        self._forming.clear()
        failed = 0
        for item in waiting:
            failed += self._fail(item, error)
            self._settled(item)
        return failed

    def _fail_pending(self, error: BaseException) -> None:
        self._fail_waiting(error)
        if self._stopped:
            # Closing: ``_release`` ends the runs, so their requests fail now (settled
            # as the runs end, in ``_finished``). After a crash of the loop the thread
            # is fine, and its runs answer their requests.
            for batch in self._in_flight:
                for item in batch:
                    self._fail(item, error)

    async def _recover(self) -> None:
        # A crash between taking a slot and handing its batch over kept the slot: the
        # runs still with the thread that hold one give it back to this one as they end.
        holding = sum(run.holds_slot for run in self._runs.values())
        self._slots = asyncio.Semaphore(max(0, 2 - holding))

    @property
    def crash_label(self) -> str:
        return f"inference {self.name}"

    @staticmethod
    def _fail(item: _Item, error: BaseException) -> int:
        if item.future.done():
            return 0
        item.future.set_exception(error)
        return 1

    def _described(
        self, inputs: np.ndarray | Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], int, tuple[tuple[str, tuple[int, ...], str], ...]]:
        """(feed, rows, signature) of a request's inputs, or ``ValueError``."""
        if isinstance(inputs, np.ndarray):  # the common case, one input: no generic checks
            if len(self._input_names) != 1:
                raise ValueError(f"{self.name} takes {len(self._input_names)} named inputs")
            if inputs.ndim == 0:
                raise ValueError("inputs need a batch dimension")
            name = self._input_names[0]
            return (
                {name: inputs},
                int(inputs.shape[0]),
                ((name, inputs.shape[1:], inputs.dtype.str),),
            )
        feed = dict(inputs)
        if not self._shares_batches:
            # Each request runs alone, its inputs passed as given: without a common
            # first dimension (a scalar, a ``[1]`` beside ``[3, 4]``) it counts as a row.
            return feed, request_rows(feed), ()
        if any(array.ndim == 0 for array in feed.values()):
            raise ValueError("inputs need a batch dimension")
        rows = {int(array.shape[0]) for array in feed.values()}
        if len(rows) != 1:
            raise ValueError("every input of one request must have the same number of rows")
        signature = tuple(
            (name, tuple(array.shape[1:]), array.dtype.str) for name, array in sorted(feed.items())
        )
        return feed, rows.pop(), signature

    def check_room(
        self,
        rows: int,
        deadline: float,
        ahead: int = 0,
        nbytes: int = 0,
        way_s: float = 0.0,
        tenant: str | None = None,
    ) -> float:
        """Raise what ``submit`` would for ``rows`` (of ``nbytes``, when known) due by
        ``deadline``, before the caller builds them: ``DeadlineExpired`` when it has
        passed, ``MailboxFull`` when the mailbox is full (in requests, or in bytes:
        one request is always let into an empty one), ``tenant``'s requests hold its
        share, or the answer would come too late. ``ahead``: requests of a row each
        already on their way to the mailbox, counted as if in it; ``way_s``: how long
        these rows still take to reach it, and their answer to get back to the
        caller, beyond the wait for the model. Returns now."""
        now = time.monotonic()
        if deadline <= now:
            self.stats.expired += 1
            raise DeadlineExpired(f"the deadline passed before {self.name} was asked")
        if self.mailbox_depth + ahead >= self._mailbox_size:
            self.stats.rejected += 1
            raise MailboxFull(f"inference mailbox of {self.name} is full")
        if self._held_bytes and self._held_bytes + nbytes > self._mailbox_bytes:
            self.stats.rejected += 1
            raise MailboxFull(f"inference mailbox of {self.name} is full (input bytes)")
        lane = SHARED_LANE
        if tenant is not None:
            self._check_share(tenant, nbytes)
            lane = tenant
        if now + way_s + self._expected_wait_s(rows + ahead, now, lane) > deadline:
            self.stats.rejected += 1
            raise MailboxFull(f"{self.name} cannot answer before the request's deadline")
        return now

    def _check_share(self, tenant: str, nbytes: int) -> None:
        share = self._shares.get(tenant)
        if share is None:
            return
        # Queued and handed to the thread behind the batch computing: both take room
        # of the mailbox (``mailbox_depth``). Counted queued only, a flooding tenant
        # refilled its share behind its batch waiting in the thread and held the
        # whole mailbox, the others refused as full (a review).
        if share.requests + share.waiting >= self._tenant_requests or (
            share.nbytes and share.nbytes + nbytes > self._tenant_bytes
        ):
            self.stats.rejected += 1
            raise MailboxFull(
                f"inference mailbox of {self.name}: this tenant's requests hold its share"
            )

    def _whole_queue_batches(self, rows: int) -> int:
        """The batches until ``rows`` more are computed behind the whole queue, in full
        batches (as before there were lanes: what one tenant alone is admitted)."""
        return max(1, -(-(self._queued_rows + rows) // self._max_batch_size))

    def _batches_ahead(self, rows: int, lane: str) -> int:
        """The batches until ``rows`` more of ``lane`` are computed: the turns of its
        lane up to them, and as many turns of each other lane (``take_turns_of``).
        A lane's first turn is its first request's when that takes more than half a
        batch (a review: a 1,000-row request ahead of small ones was counted at the
        lane's mean); the rest at the lane's mean rows a request. A turn of more than
        half a batch is a batch of its own (or as many as its rows fill: a review
        counted 22-row requests packed in full batches, and they fill batches of 44);
        smaller turns fill batches together, whoever's they are. For several lanes
        (``_expected_wait_s`` counts one alone); with more than ``LANES_COUNTED``, the
        whole queue in full batches."""
        most = self._max_batch_size
        lanes = self._lane_rows
        if len(lanes) > LANES_COUNTED:
            return self._whole_queue_batches(rows)
        mailbox = self._mailbox
        head = mailbox.head_of(lane)
        turns, whole, packed = self._lane_batches(
            mailbox.held_by(lane) + 1,
            lanes.get(lane, 0) + rows,
            rows if head is None else head.rows,
            -1,
        )
        for other, other_rows in lanes.items():
            if other != lane:
                head = mailbox.head_of(other)
                _, lane_whole, lane_packed = self._lane_batches(
                    mailbox.held_by(other), other_rows, 0 if head is None else head.rows, turns
                )
                whole += lane_whole
                packed += lane_packed
        return max(1, whole + -(-int(packed) // most))

    def _lane_batches(
        self, requests: int, rows: int, head_rows: int, most_turns: int
    ) -> tuple[int, int, float]:
        """(turns, batches of its own, rows packed with other lanes') of a lane of
        ``requests`` holding ``rows``, the first ``head_rows``, over at most
        ``most_turns`` turns (-1: all it takes)."""
        most = self._max_batch_size
        turns = whole = 0
        if requests > 0 and 2 * head_rows > most:
            # The first request is a turn of its own, a batch or more.
            turns, whole = 1, -(-head_rows // most)
            requests, rows = requests - 1, rows - head_rows
        if requests <= 0 or turns == most_turns:
            return turns, whole, 0.0
        mean = rows / requests
        if 2 * mean > most:
            each, turn_rows = 1, mean  # a request a turn
        else:
            each = most // max(1, int(mean))  # requests a turn, while their rows fit
            turn_rows = min(each, requests) * mean
        more = -(-requests // each)
        if most_turns >= 0:
            more = max(0, min(more, most_turns - turns))
        if 2 * turn_rows > most:
            return turns + more, whole + more * -(-int(turn_rows) // most), 0.0
        return turns + more, whole, min(rows, more * turn_rows)

    def _expected_wait_s(self, rows: int, now: float, lane: str = SHARED_LANE) -> float:
        """How long new rows would take to be answered, from recent batch run times
        (0 until a batch has run, or for one batch while the estimate is stale): the
        batches queued ahead, the one computing, and the batch of these rows; plus how
        far the one computing has run past that estimate (a run stuck for seconds
        says more than the estimate: a review saw requests admitted for ever behind a
        first run that never ended, since there was no estimate yet)."""
        overrun = self._overrun_s(now) if self._in_flight else 0.0
        if self._run_time_s <= 0:
            return overrun
        if self._shares_batches:
            lanes = self._lane_rows
            if len(lanes) > 1 or lanes and lane not in lanes:
                batches = self._batches_ahead(rows, lane)
            else:  # one lane (as without keys) is first come, first served
                batches = self._whole_queue_batches(rows)
            if batches <= 1 and self._estimate_is_stale():
                return overrun
        else:
            # Each request is a run of its own, whatever its rows (a review: 64 rows of
            # a model without batching were 64 runs, and an idle model refused them).
            queued = self._mailbox.qsize()
            if not queued and self._estimate_is_stale():
                return overrun
            batches = queued + 1
        return (batches + len(self._in_flight)) * self._run_time_s + overrun

    def _overrun_s(self, now: float) -> float:
        """How long the run computing has gone past the estimate (0 until it starts:
        a run waiting in the thread behind another is no overrun of its own)."""
        started_at = self._runs[id(self._in_flight[0])].started_at
        if started_at is None:
            return 0.0
        return max(0.0, now - started_at - self._run_time_s)

    def _took(self, item: _Item) -> _Item:
        """``item`` left the mailbox: its rows no longer queue."""
        rows = item.rows
        self._queued_rows -= rows
        lane_rows = self._lane_rows
        left = lane_rows.get(item.lane, 0) - rows  # a lane of requests of no rows: 0
        if left > 0:
            lane_rows[item.lane] = left
        else:
            lane_rows.pop(item.lane, None)
        tenant = item.tenant
        if tenant is not None:
            share = self._shares[tenant]
            share.requests -= 1
            self._forget_if_idle(tenant, share)
        return item

    def _hold_waiting(self, items: list[_Item], change: int) -> None:
        """Count (1) or uncount (-1) ``items`` as waiting in the thread in their
        tenants' shares."""
        for item in items:
            if item.tenant is not None:
                share = self._shares.get(item.tenant)
                if share is not None:
                    share.waiting += change
                    self._forget_if_idle(item.tenant, share)

    def _settled(self, item: _Item) -> None:
        """``item`` is answered (or failed): its bytes no longer wait."""
        if item.settled:
            return
        item.settled = True
        self._held_bytes -= item.nbytes
        self._mailbox.task_done()
        if item.tenant is not None:
            share = self._shares[item.tenant]
            share.unanswered -= 1
            share.nbytes -= item.nbytes
            self._forget_if_idle(item.tenant, share)

    def _forget_if_idle(self, tenant: str, share: _TenantShare) -> None:
        # By requests, not bytes: a request of no rows holds none (a review: forgotten
        # while it was still unanswered, its tenant's share was gone when it settled).
        if not share.requests and not share.unanswered and not share.waiting:
            del self._shares[tenant]

    async def _release(self) -> None:
        # A run still going after the drain is ended (its items have failed), and not
        # waited for: a model that runs for ever, or a node that does not check the
        # flag, would otherwise hold the event loop, and with it every request and the
        # shutdown's own deadline.
        _end(run.options for run in self._runs.values())
        if self._deadline_watch is not None:
            self._deadline_watch.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # At most two batches handed to the thread: one computing, the next queued
            # behind it, so the model starts the next batch as soon as one ends,
            # however busy the event loop is (answering a flood of refusals, say).
            await self._slots.acquire()
            try:
                live = self._drop_expired(await self._take_batch())
            except BaseException:
                self._slots.release()
                raise
            if live:
                self._hand_to_thread(loop, live)
            else:
                # Every row expired before it could run (deadlines shorter than the
                # way to the model): the try counts as a run for staleness, or a stale
                # estimate would let such a flood in a batch every turn, not once.
                self._last_ran_at = time.monotonic()
                self._slots.release()
            # Until here the batch was ``_forming``: a crash before it reached the
            # thread fails it (``_fail_pending``) rather than leave it unanswered.
            self._forming = []

    def _drop_expired(self, batch: list[_Item]) -> list[_Item]:
        now = time.monotonic()
        live: list[_Item] = []
        for item in batch:
            if item.future.done():  # the client went away
                self._settled(item)
            elif item.deadline <= now:
                self._count_expired(item, now)
                item.future.set_exception(
                    DeadlineExpired(f"deadline passed while queued for {self.name}")
                )
                self._settled(item)
            else:
                live.append(item)
        return live

    async def _take_batch(self) -> list[_Item]:
        first = self._carry if self._carry is not None else self._took(await self._mailbox.get())
        self._carry = None
        batch, rows = [first], first.rows
        self._forming = batch  # seen by ``_fail_pending`` and the deadline watch
        if self._in_flight:
            # While another batch computes, this one cannot start before it ends: it
            # keeps filling until then (or until full), not just for the queue delay.
            fill_until = max(first.enqueued + self._max_queue_delay_s, self._busy_until)
        else:
            # The model is idle: waiting would only add latency (what arrives meanwhile
            # batches behind this one). Take what is queued already and go.
            fill_until = 0.0
        nearest = first.deadline
        while self._shares_batches and rows < self._max_batch_size:
            if self._mailbox.empty():
                wait = min(fill_until, nearest - self._run_time_s) - time.monotonic()
                if wait <= 0:
                    break
                try:
                    async with asyncio.timeout(wait):
                        item = self._took(await self._mailbox.get())
                except TimeoutError:
                    break
            else:
                item = self._took(self._mailbox.get_nowait())
            if rows + item.rows > self._max_batch_size or item.signature != first.signature:
                self._carry = item
                break
            batch.append(item)
            rows += item.rows
            nearest = min(nearest, item.deadline)
        return batch

    def _new_options(self) -> RunOptions | None:
        if self._run_options is None:
            return None
        options = type(self._run_options)()
        options.log_severity_level = self._run_options.log_severity_level
        return options

    def _watch(self, at: float) -> None:
        """Have ``_watch_deadlines`` run at ``at`` (monotonic), or earlier."""
        if self._deadline_watch is not None:
            self._deadline_watch.cancel()
        loop = asyncio.get_running_loop()
        self._watch_at = at
        self._deadline_watch = loop.call_later(max(0.0, at - time.monotonic()), self._watch_deadlines)

    def _watch_deadlines(self) -> None:
        """While a batch is with the thread, fail each request whose deadline has
        passed, computing or queued, at its deadline (``DeadlineExpired``, a 504),
        not when the run ends: a review saw a 200 ms deadline answered after 2.9 s
        behind a slow run, and a request behind a run that never ended not answered
        at all. A run whose requests are all answered so is ended (``terminate``),
        freeing the model for those behind it. Armed for the earliest deadline handed
        to the thread (or of a request queued meanwhile, if earlier), and left armed
        while the thread is idle, when it does nothing: no cost to a request answered
        in time."""
        self._deadline_watch, self._watch_at = None, math.inf
        if not self._in_flight:
            return
        now = time.monotonic()
        nearest = math.inf
        for position, items in enumerate(self._in_flight):
            where = "queued" if position else "computing"  # behind the run, in the thread
            for item in items:
                nearest = min(nearest, self._expire(item, now, where))
            if all(item.future.done() for item in items):
                _end([self._runs[id(items)].options])
        queued: list[_Item] = [*self._mailbox_items(), *self._forming]
        if self._carry is not None:
            queued.append(self._carry)
        for item in queued:
            # Settled when the worker takes it (``_drop_expired``), as a request gone.
            nearest = min(nearest, self._expire(item, now, "queued"))
        if nearest < math.inf:
            # At most every ``WATCH_GAP_S``: each firing reads every queued request,
            # and a full mailbox of distinct deadlines expiring one after another
            # would take the loop (a review: 0.8 s of it for 4,096 requests).
            self._watch(max(nearest, now + WATCH_GAP_S))

    def _mailbox_items(self) -> list[_Item]:
        """The requests in the mailbox, read and left there: ``asyncio.Queue`` keeps
        them in its deque ``_queue`` (taking them out and back would reorder them
        against a ``put`` woken meanwhile)."""
        return list(getattr(self._mailbox, "_queue", ()))

    def _expire(self, item: _Item, now: float, where: str) -> float:
        """Fail ``item`` if its deadline has passed; else its deadline (inf if done)."""
        if item.future.done():
            return math.inf
        if item.deadline > now:
            return item.deadline
        self._count_expired(item, now)
        item.future.set_exception(
            DeadlineExpired(f"deadline passed while {where} for {self.name}")
        )
        return math.inf

    def _count_expired(self, item: _Item, now: float) -> None:
        """A request of this model's queue answered 504: a failed request, as Triton's
        statistics count a timeout (a review: counted a success, or not at all)."""
        self.stats.expired += 1
        self.stats.fail.add(1, now - item.enqueued)

    def _hand_to_thread(
        self,
        loop: asyncio.AbstractEventLoop,
        items: list[_Item],
        holds_slot: bool = True,
        check: BaseException | None = None,
    ) -> None:
        """Queue the batch on the worker's thread; ``_finished`` answers it.
        ``holds_slot``: it took one of ``_slots`` (a retry alone takes none);
        ``check``: a lone item's failure, checked as ``_checked_run`` says."""
        total = sum(item.rows for item in items)
        gathering = time.perf_counter()
        try:
            if len(items) == 1:
                feed = items[0].inputs
            else:
                feed = {
                    name: np.concatenate([item.inputs[name] for item in items])
                    for name in items[0].inputs
                }
        except Exception as exc:
            self._failed(items, total, exc)
            self._done_with(items)
            if holds_slot:
                self._slots.release()
            return
        started = time.monotonic()
        remeasure = self._estimate_is_stale()  # this run replaces the estimate
        self._busy_until = max(started, self._busy_until) + self._run_time_s * max(
            1.0, total / self._max_batch_size
        )
        run = _Run(
            self._spare_options.pop() if self._spare_options else self._new_options(), started, holds_slot
        )
        run.input_s = time.perf_counter() - gathering
        if len(items) == 1:
            earliest = latest = items[0].deadline
        else:
            earliest = min(item.deadline for item in items)
            latest = max(item.deadline for item in items)
        try:
            if check is None:
                future = loop.run_in_executor(self._executor, self._timed_run, feed, latest, run)
            else:
                again = not items[0].failed_in_batch
                future = loop.run_in_executor(
                    self._executor, self._checked_run, feed, latest, run, check, again
                )
        except RuntimeError as exc:  # the executor is shut down (closed past its drain)
            self._failed(items, total, WorkerClosed(f"inference worker {self.name} stopped: {exc}"))
            self._done_with(items)
            if holds_slot:
                self._slots.release()
            return
        if self._in_flight:  # behind the batch computing: its requests still take room
            self._hold_waiting(items, 1)
        self._in_flight.append(items)
        self._runs[id(items)] = run
        if earliest < self._watch_at:
            self._watch(earliest)
        future.add_done_callback(
            lambda done: self._finished(done, items, started, total, remeasure, holds_slot)
        )

    def _finished(
        self,
        done: asyncio.Future[tuple[Sequence[np.ndarray] | None, float]],
        items: list[_Item],
        started: float,
        total: int,
        remeasure: bool = False,
        holds_slot: bool = True,
    ) -> None:
        # By identity: batches of equal items would compare their arrays.
        position = next(at for at, batch in enumerate(self._in_flight) if batch is items)
        del self._in_flight[position]
        if position:  # ended before it computed (cancelled, failed with its worker)
            self._hold_waiting(items, -1)
        if position == 0 and self._in_flight:  # the next one computes now
            self._hold_waiting(self._in_flight[0], -1)
        run = self._runs.pop(id(items))
        if run.options is not None and not run.options.terminate:
            self._spare_options.append(run.options)  # not ended: good for another run
        # The deadline watch stays armed when the thread is idle (it does nothing
        # then): a fast model is idle between most batches, and a timer set and
        # cancelled each batch cost its single-row predicts ~5% (bench.workload).
        if holds_slot:
            self._slots.release()
        answering = False
        try:
            if done.cancelled():
                return
            error = done.exception()
            if error is not None:  # a failed run fails its batch, not the worker
                if all(item.future.done() for item in items):
                    # Ended because nobody waits for it (``_watch_deadlines``, closing):
                    # the try counts for staleness, as a batch expired in the queue,
                    # and the time it ran is the least a batch takes (a review: a model
                    # slower than every deadline, each run ended, never learnt its time
                    # and admitted every request, each to expire).
                    now = time.monotonic()
                    self._last_ran_at = now
                    if run.started_at is not None and (total <= self._max_batch_size or not self._shares_batches):
                        self._learn_from_ended_run(now - run.started_at)
                    return
                if len(items) > 1:
                    answering = True  # each item is settled by its own run, or here
                    self._run_alone(items, total, error)
                    return
                if self._to_check(items[0], error):
                    items[0].checked = True
                    answering = True  # settled by the checked run
                    self._hand_to_thread(items[0].future.get_loop(), items, holds_slot=False, check=error)
                    return
                self._failed(items, total, error)
                return
            outputs, run_s = done.result()
            if outputs is None:  # every deadline passed while queued behind a batch
                self._last_ran_at = time.monotonic()  # as in ``_run``: the try counts
                for item in items:
                    if not item.future.done():  # the watch may have expired it already
                        self._count_expired(item, time.monotonic())
                        item.future.set_exception(
                            DeadlineExpired(f"deadline passed while queued for {self.name}")
                        )
                return
            if len(items) > 1 and not all(
                np.ndim(value) and np.shape(value)[0] == total for value in outputs
            ):
                # The load's runs said outputs follow the input's rows; these do not (a
                # count that depends on the values, as a detection model's): no request
                # may see another's rows, so each runs alone, now and from now.
                self._shares_batches = False
                self._max_batch_size = 1  # as a model refused sharing at its load
                answering = True
                error = RuntimeError(f"model {self.name}: outputs not one row per input row")
                self._run_alone(items, total, error)
                return
            answers = self._answers(items, total, started, outputs, run_s, remeasure, run.input_s)
            answering = True
            # Refusing requests (``check_room``) since the last answers: an overload,
            # where answering refusals fast matters more than the next batch's shape.
            refusing = self.stats.rejected != self._rejected_seen
            self._rejected_seen = self.stats.rejected
            self._deliver(answers, 0, ANSWER_CHUNK if refusing else len(answers))
        finally:
            if not answering:  # otherwise ``_deliver`` settles each item as it answers it
                self._done_with(items)

    def _learn_from_ended_run(self, ran_s: float) -> None:
        """A run ended at its deadline after ``ran_s``: a batch takes that long at least.
        With no estimate yet it is the estimate; else it weighs in as one more run
        would, only upwards (a review: taken whole, one slow input with a 3 s deadline
        made a healthy model refuse 1 s deadlines for 12 s)."""
        if self._run_time_s <= 0:
            self._run_time_s = ran_s
        elif ran_s > self._run_time_s:
            self._run_time_s += _RUN_TIME_WEIGHT * (ran_s - self._run_time_s)

    def _run_alone(self, items: list[_Item], total: int, error: BaseException) -> None:
        """A batch of several items failed: run each again in a batch of its own, so
        that the input at fault fails its own request only (a review: one client's
        out-of-range index failed the 40 requests batched with it, then opened the
        model's breaker for everyone)."""
        log.warning(
            "inference_batch_failed_running_alone",
            model=self.name,
            rows=total,
            requests=len(items),
            error=repr(error),
            request_ids=[item.request_id for item in items],
        )
        loop = items[0].future.get_loop()
        for item in items:
            if item.future.done():  # the client went away meanwhile
                self._settled(item)
            else:
                item.failed_in_batch = True
                self._hand_to_thread(loop, [item], holds_slot=False)

    def _to_check(self, item: _Item, error: BaseException) -> bool:
        """Whether a lone item's failed run is tried again with the known-good feed:
        once, for an error that does not already name the input, while its caller waits."""
        return (
            self._known_good is not None
            and not item.checked
            and not item.future.done()
            and not isinstance(error, (InvalidArgument, _InputAtFault))
        )

    def _checked_run(
        self,
        feed: Mapping[str, np.ndarray],
        latest_deadline: float,
        run: _Run,
        failure: BaseException,
        again: bool,
    ) -> tuple[Sequence[np.ndarray] | None, float]:
        """In the thread: a lone item that failed with ``failure``, run ``again`` first
        (computing now, it is answered, and the model shows itself unreliable); then
        the input's fault only if the model is known to work (see the module's
        docstring), else the model's, ``failure`` raised."""
        options = run.options
        if again:
            try:
                answered = self._timed_run(feed, latest_deadline, run)
            except Exception as exc:
                if options is not None and options.terminate:
                    raise  # ended (its deadline, closing): says nothing of the input
                failure = exc
            else:
                if answered[0] is not None:
                    # Computed: not run at all (its deadline passed first) says nothing
                    # (a review: deadlines timed to pass between the two runs marked a
                    # sound model unreliable, and then anyone's bad input counted).
                    self._unreliable_until = time.monotonic() + UNRELIABLE_S
                return answered
        now = time.monotonic()
        known_good = self._known_good
        # The warm-up's zeros vouch for a model only while it answers real requests; a
        # row of real traffic it answered vouches for it for longer (a review: past 60 s
        # idle, one tenant's bad rows opened the breaker for all), but not for ever (a
        # review: one answered row of zeros made a model failing on any other value
        # blame its clients with no end).
        idle_s = now - self._served_at
        vouched = idle_s <= SERVED_WITHIN_S or (self._known_good_is_traffic and idle_s <= TRAFFIC_VOUCHES_S)
        if known_good is None or now < self._unreliable_until or not vouched:
            raise failure
        if now - self._known_good_ok_at > KNOWN_GOOD_HOLDS_S:
            try:
                if options is None:
                    self._session.run(self._output_names, known_good)
                else:
                    self._session.run(self._output_names, known_good, options)
            except Exception:
                if options is None or not options.terminate:
                    self._unreliable_until = time.monotonic() + UNRELIABLE_S
                raise failure from None
            self._known_good_ok_at = time.monotonic()
        raise _InputAtFault(failure)

    def _failed(self, items: list[_Item], total: int, error: BaseException) -> None:
        if isinstance(error, (InvalidArgument, _InputAtFault)):
            refused = _ORT_PREFIX.sub("", str(error), count=1)
            log.warning(
                "inference_input_refused",
                model=self.name,
                rows=total,
                error=refused,
                **_requests_named(items),
            )
            error = InputRefused(f"model {self.name} could not compute this input: {refused}")
        else:
            log.error(
                "inference_failed",
                model=self.name,
                rows=total,
                error=repr(error),
                **_requests_named(items),
            )
        now = time.monotonic()
        failing = [item for item in items if not item.future.done()]
        self.stats.fail.add(len(failing), sum(now - item.enqueued for item in failing))
        for item in failing:
            item.future.set_exception(error)

    def _done_with(self, items: list[_Item]) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(WorkerClosed(f"inference worker {self.name} stopped"))
            self._settled(item)

    @property
    def shares_batches(self) -> bool:
        """Requests share runs (False from the load on, or since a shared run's outputs
        did not keep its rows)."""
        return self._shares_batches

    @property
    def batches_rows(self) -> bool:
        """Whether its batch is rows of requests (Triton's ``max_batch_size`` above 0):
        they share runs, more than one row at a time. Else a request is a batch of 1
        whatever its first dimension, as Triton counts one without batching."""
        return self._shares_batches and self._max_batch_size > 1

    def _answers(
        self,
        items: list[_Item],
        total: int,
        started: float,
        outputs: Sequence[np.ndarray],
        run_s: float,
        remeasure: bool,
        input_s: float = 0.0,
    ) -> list[tuple[_Item, Outputs]]:
        """Each item with its slice of the outputs; the run counted in the stats and in
        the running estimate of a batch's time."""
        splitting = time.perf_counter()
        self._last_ran_at = time.monotonic()
        weight = _RUN_TIME_WEIGHT if self.stats.batches and not remeasure else 1.0
        if total <= self._max_batch_size or not self._shares_batches:
            # A model without batching: each request is a run, its own whatever its
            # rows, so each run is the estimate's (a large one raises it for a while:
            # the stale-estimate escape lets one request in to measure again; a review
            # saw the estimate frozen at a run over its rows).
            self._run_time_s += weight * (run_s - self._run_time_s)
        elif self._run_time_s <= 0:
            # Only an oversized item has run: its share of a full batch, a first guess
            # (low by the run's fixed cost) that the next full batch replaces.
            self._run_time_s = run_s * self._max_batch_size / total
        self.stats.batches += 1
        counted = total if self.batches_rows else len(items)
        self.stats.rows_computed += counted
        queued = started - min(item.enqueued for item in items)
        self._telemetry.inference_batch_ran(self.model, self.version, total, queued, run_s)
        named = dict(zip(self._output_names, outputs, strict=True))
        answers = []
        offset = 0
        for item in items:
            end = offset + item.rows
            sliced = {
                name: value[offset:end] if value.ndim and value.shape[0] == total else value
                for name, value in named.items()
            }
            answers.append((item, sliced))
            offset = end
        self._count_answered(items, counted, started, run_s, input_s, time.perf_counter() - splitting)
        return answers

    def _count_answered(
        self, items: list[_Item], rows: int, started: float, run_s: float, input_s: float, output_s: float
    ) -> None:
        """The statistics of a batch answered: per request (each its batch's times, as
        Triton counts them) and for its batch size."""
        stats = self.stats
        # Not those the deadline watch failed while the batch ran: counted failed then.
        items = [item for item in items if not item.future.done() or item.future.cancelled()]
        count = len(items)
        if not count:
            return  # each failed while it ran (a review: IndexError below)
        now = time.monotonic()
        enqueued = sum(item.enqueued for item in items)
        stats.success.add(count, count * now - enqueued)
        stats.queue.add(count, count * started - enqueued)
        stats.compute_input.add(count, count * input_s)
        stats.compute_infer.add(count, count * run_s)
        stats.compute_output.add(count, count * output_s)
        sized = stats.by_batch_size.get(rows)
        if sized is None:
            sized = stats.by_batch_size[rows] = BatchStats()
        sized.compute_input.add(1, input_s)
        sized.compute_infer.add(1, run_s)
        sized.compute_output.add(1, output_s)
        stats.last_inference_ms = int(time.time() * 1000)
        self._served_at = now
        if self._shares_batches and items[0].rows and now - self._known_good_taken_at > KNOWN_GOOD_EVERY_S:
            # A row of real traffic the model computed: a better known-good feed than
            # the warm-up's zeros, which exercise little of a model.
            self._known_good_taken_at = now
            self._known_good = {name: value[:1].copy() for name, value in items[0].inputs.items()}
            self._known_good_is_traffic = True

    def _deliver(self, answers: list[tuple[_Item, Outputs]], start: int, chunk: int) -> None:
        """Answer ``answers[start:]``, ``chunk`` of them now and the rest in the event
        loop's next turns (``chunk`` is all of them unless the worker is refusing).

        Each answer wakes its request's task, and the loop runs every task woken in one
        turn before it reads a socket again. Under a retry storm of tight deadlines
        (bench.overload's last phase) a batch of 64 answers at once made the requests
        arriving meanwhile, most of them to be refused, wait ~5 ms to be read: 503 p50
        5 ms, p99 10 ms; two answers a turn made it 0.2 ms and 4.4 ms. Without
        refusals the batch goes at once: its clients' next requests then come back
        together and form one batch, where chunks cost a fifth of the answers a second
        with 32 connections (batches split small).
        """
        end = min(start + chunk, len(answers))
        for item, outputs in answers[start:end]:
            if not item.future.done():
                item.future.set_result(outputs)
            self._settled(item)
        if end < len(answers):
            item.future.get_loop().call_soon(self._deliver, answers, end, chunk)

    def _timed_run(
        self, feed: Mapping[str, np.ndarray], latest_deadline: float, run: _Run
    ) -> tuple[Sequence[np.ndarray] | None, float]:
        """In the thread: the outputs and how long the run itself took (not the wait
        in the thread's queue, nor the event loop's delay in noticing). A batch whose
        every deadline passed while it waited for the thread is not computed (None)."""
        started = time.monotonic()
        if started >= latest_deadline:
            return None, 0.0
        run.started_at = started
        options = run.options
        if options is None:
            outputs = self._session.run(self._output_names, feed)
        else:
            outputs = self._session.run(self._output_names, feed, options)
        return outputs, time.monotonic() - started



def _requests_named(items: list[_Item]) -> dict[str, Any]:
    """The fields naming the requests a log line is about: ``request_id`` for one, as
    every line of a request carries it, else ``request_ids``."""
    if len(items) == 1:
        return {"request_id": items[0].request_id}
    return {"request_ids": [item.request_id for item in items]}
