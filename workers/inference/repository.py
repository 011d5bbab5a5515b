"""ModelRepository: the ONNX models mlgate serves, loaded from a Triton-layout directory.

Layout: ``<repo>/<model>/<version>/model.onnx`` (versions are positive integers) with
an optional ``<repo>/<model>/config.json``::

    {"max_batch_size": 64, "max_queue_delay_ms": 2.0, "kind": "classifier",
     "labels": ["no", "yes"], "version_policy": {"latest": 1}}

``version_policy`` is ``{"latest": N}`` (the default, N=1), ``"all"`` or
``{"specific": [1, 3]}``. Input and output metadata come from the ONNX graph.

Each loaded (model, version) gets its own ``InferenceWorker``. Loading (session
creation and a warm-up run on zeros) happens in the repository's own thread, then the
new version is swapped into the routing table in one step; a version it replaces or
retires is closed only after its mailbox has drained, so in-flight requests finish.
A version that fails to load is reported in ``index()`` with its reason and changes
nothing else: the versions already serving keep serving. The same broken file is not
retried until it changes on disk.

Changes are picked up by polling every ``model_poll_interval_s`` (0 disables it) and
by explicit ``load(model)`` / ``unload(model)``, the repository extension's calls.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
import structlog

from mlgate.config import Settings
from mlgate.workers.breaker import Breaker
from mlgate.workers.errors import DeadlineExpired, InputRefused, MailboxFull, WorkerClosed
from mlgate.workers.inference.batching import InferenceWorker, Outputs
from mlgate.workers.inference.model_config import (
    CONFIG_FILE,
    NAME_RULE,
    Kind,
    ModelConfig,
    ModelConfigError,
    ModelConfigUnreadable,
    State,
    TensorSpec,
    file_fingerprint,
    guess_kind,
    model_name_allowed,
    open_session,
    quiet_run_options,
    read_config,
    versions_on_disk,
)
from mlgate.workers.supervision import SupervisedTask, background_context
from mlgate.workers.telemetry import NO_TELEMETRY, WorkerTelemetry

T = TypeVar("T")
log = structlog.get_logger("mlgate.models")

class ModelNotFound(LookupError):
    """No such model, or no such version of it, is serving."""


class ModelUnavailable(ModelNotFound):
    """The model (or that version) is in the repository but failed to load here: not
    a wrong name, and perhaps served again soon (a fixed file, another process)."""


class ModelLoadFailed(Exception):
    """An explicit load left the model without a serving version."""


@dataclass(eq=False)
class ModelVersion:
    """One loaded, warmed-up version, the worker that runs it and its circuit breaker."""

    model: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    config: ModelConfig
    kind: Kind
    batchable: bool
    max_batch_size: int
    worker: InferenceWorker
    fingerprint: tuple[int, ...]
    breaker: Breaker

    async def infer(
        self,
        inputs: np.ndarray | Mapping[str, np.ndarray],
        deadline: float,
        request_id: str | None = None,
        held_bytes: int = 0,
        tenant: str | None = None,
    ) -> Outputs:
        """This request's outputs. ``BreakerOpen`` at once while the model keeps failing;
        load (a full mailbox, a passed deadline) does not count as the model failing."""

        return await self.breaker.call(
            self.worker.submit,
            inputs,
            deadline,
            request_id=request_id,
            held_bytes=held_bytes,
            tenant=tenant,
        )


def _quoted(name: str, keep: int = 100) -> str:
    """``name`` quoted for an error's text, cut at ``keep`` characters: a request's
    10 MB model name was echoed whole in its 404 (a review)."""
    return repr(name) if len(name) <= keep else f"{name[:keep]!r}... ({len(name)} characters)"


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str | None = None
    state: State | None = None
    reason: str = ""
    failed: bool = False  # unavailable because its load or its config failed


class ModelRepository:
    """The routing table of serving versions, and the loader that keeps it current."""

    def __init__(
        self,
        settings: Settings,
        root: str | Path | None = None,
        *,
        telemetry: WorkerTelemetry = NO_TELEMETRY,
    ) -> None:
        self.settings = settings
        self._telemetry = telemetry
        self.root = Path(root if root is not None else settings.model_repository)
        self._serving: dict[str, dict[str, ModelVersion]] = {}
        self._latest: dict[str, ModelVersion] = {}
        self._states: dict[str, dict[str, IndexEntry]] = {}
        self._failed: dict[tuple[str, str], tuple[int, ...]] = {}
        # Each model's config.json as last read, by its file's fingerprint (``_config_of``).
        self._configs: dict[str, tuple[tuple[int | bool, ...], ModelConfig | ModelConfigError, int]] = {}
        self._unloaded: set[str] = set()
        self._ignored: set[str] = set()  # directories whose names are not served, logged
        # One per model: an unload or a load of one model does not wait for another's
        # load (up to ``model_load_timeout_s``).
        self._locks: dict[str, asyncio.Lock] = {}
        self._changed = asyncio.Event()
        # Versions replaced and closing (draining their queued requests), by the task.
        self._retiring: dict[asyncio.Task[None], ModelVersion] = {}
        self._poller: SupervisedTask | None = None
        # Each model's sync under way (``_start_syncs``): one at a time per model, and a
        # slow load holds up no other model's.
        self._syncing: dict[str, asyncio.Task[None]] = {}
        # Loads past their timeout whose thread has not ended (a session's creation
        # cannot be stopped): no other load of that version starts until it does (a
        # review: each change of a slow model's file started another, 5 GB in all).
        # By (model, version): the load's thread's outcome, and the fingerprint it loads.
        self._abandoned: dict[tuple[str, str], tuple[asyncio.Future[Any], tuple[int, ...]]] = {}
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        await self.poll()
        self._started = True
        if self.settings.model_poll_interval_s > 0:
            self._poller = SupervisedTask("model-poller", self._poll_forever, self._telemetry)
            self._poller.start()
        log.info("models_started", root=str(self.root), serving=self.serving_summary())
        if not self.root.is_dir():
            # Served as an empty repository (models may be put there later), but a
            # mistyped path would leave the host unready with nothing said (a review).
            log.warning("model_repository_missing", root=str(self.root), setting="MLGATE_MODEL_REPOSITORY")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._poller is not None:
            await self._poller.stop()
        syncs = list(self._syncing.values())
        for sync in syncs:
            # A poll's load under way is given up (its warm-up told to end): waited for,
            # a load of minutes held the whole shutdown budget (a review).
            sync.cancel()
        locks = list(self._locks.values())
        for lock in locks:  # an explicit load under way ends first
            await lock.acquire()
        try:
            versions = [v for by_version in self._serving.values() for v in by_version.values()]
            self._serving, self._latest = {}, {}
        finally:
            for lock in locks:
                lock.release()
        await asyncio.gather(*(self._close_version(v) for v in versions), *self._retiring)
        await asyncio.gather(*syncs, return_exceptions=True)  # each sees closed and ends

    # -- lookups -----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Started, the default model serves at least one version, and no version's
        worker is restarting after a crash (or settling after its restart)."""
        return self.ready_for_any_model and self.settings.default_model in self._latest

    @property
    def ready_for_any_model(self) -> bool:
        """``ready`` without the default model: what the Open Inference Protocol's
        readiness says, as Triton's depends on the repository's models alone (a review:
        a repository without the REST routes' default model, ``demo`` unless set, kept
        ``/v2/health/ready`` false, and a Triton client waiting on it waited forever).
        Some model serves, though: a repository that serves none is not ready."""
        return self._started and not self._closed and bool(self._latest) and not self._unsettled_workers()

    @property
    def problem(self) -> str | None:
        """Why it is not ready, for ``/ready`` (None when it is)."""
        if self.ready:
            return None
        if self._closed:
            return "closed"
        if not self._started:
            return "models are loading"
        try:
            self.resolve(self.settings.default_model)
        except ModelNotFound as exc:
            if not self.root.is_dir():  # a mistyped MLGATE_MODEL_REPOSITORY (a review)
                return f"the default model: {exc}: the model repository {self.root} is no directory"
            return f"the default model: {exc}"
        unsettled = self._unsettled_workers()
        if unsettled:
            return "the inference worker of " + ", ".join(unsettled) + " restarts after a crash"
        return None

    @property
    def degraded(self) -> str | None:
        """The versions serving whose breaker is open (their requests refused ``503``
        while the others serve), for ``/ready``'s ``degraded``; None when there are none."""
        failing = [version.worker.name for version in self.serving() if version.breaker.unavailable]
        if not failing:
            return None
        return "failing, their requests refused until a trial succeeds: " + ", ".join(sorted(failing))

    def _unsettled_workers(self) -> list[str]:
        return [worker.name for worker in self.workers() if not worker.healthy]

    def resolve(self, model: str, version: str | None = None) -> ModelVersion:
        """The serving version (``None``/``"latest"``: the highest one ready). A number
        written with leading zeros names the version it is (``01`` is 1), as a version
        directory's name does and as Triton reads one (a review: 404 where Triton
        served version 1)."""
        if version is not None and len(version) > 1 and version[0] == "0" and version.isascii() and version.isdigit():
            version = str(int(version))
        if version in (None, "", "latest"):
            found = self._latest.get(model)
        else:
            found = self._serving.get(model, {}).get(str(version))
        if found is None:
            what = (
                f"model {_quoted(model)}"
                if version in (None, "", "latest")
                else f"version {_quoted(str(version))} of model {_quoted(model)}"
            )
            entries = self._states.get(model, {})
            asked = [
                entry
                for entry in (
                    entries.values()
                    if version in (None, "", "latest")
                    else [entries.get(str(version))]
                )
                if entry is not None
            ]
            failed = [entry for entry in asked if entry.failed]
            if failed:
                raise ModelUnavailable(f"{what} is not serving: {failed[-1].reason}")
            if any(entry.state == "LOADING" for entry in asked):
                raise ModelUnavailable(f"{what} is not serving yet: its load is under way")
            raise ModelNotFound(f"{what} is not serving")
        return found

    def versions(self, model: str) -> list[str]:
        return sorted(self._serving.get(model, {}), key=int)

    def known(self, model: str) -> bool:
        return model in self._states or self._on_disk(model)

    def _on_disk(self, model: str) -> bool:
        return model_name_allowed(model) and (self.root / model).is_dir()

    def _model_dirs(self, names: set[str] | None = None) -> set[str]:
        """The model directories' names (``names``: the directories, listed already)."""
        if names is None:
            names = _directories(self.root)
        served = {name for name in names if model_name_allowed(name)}
        for name in sorted(names - served - self._ignored):
            # Once a name: the poll reads the directory every few seconds.
            log.warning("model_directory_ignored", name=name, rule=NAME_RULE)
            self._ignored.add(name)
        return served

    def submit(
        self,
        model: str,
        version: str | None,
        inputs: np.ndarray | Mapping[str, np.ndarray],
        deadline: float,
        *,
        request_id: str | None = None,
    ) -> tuple[ModelVersion, asyncio.Future[Outputs]]:
        """Resolve and queue in one step, so a swap cannot fall in between."""
        loaded = self.resolve(model, version)
        return loaded, loaded.worker.submit(inputs, deadline, request_id=request_id)

    def _config_of(self, name: str, model_dir: Path) -> tuple[ModelConfig, int]:
        """``read_config`` and its values' hash, read again only when its file changed
        (a review: a 35 MB config.json read and parsed at every poll held the loop 0.4 s
        each time). A file that could not be read is read again at each poll. In a
        thread, under the model's lock."""
        path = model_dir / CONFIG_FILE
        # A link to nowhere (or to itself) is no absent file: an error, not the defaults.
        # Its status change time too: a copy that keeps the times (``cp -p``, a
        # build's fixed times) moves it (a review). Only the file is read again for
        # it: a version reloads when the config's values change (``_sync``).
        fingerprint = (*file_fingerprint(path), _changed_ns(path), path.is_symlink())
        known = self._configs.get(name)
        if known is None or known[0] != fingerprint:
            try:
                config = read_config(model_dir, self.settings)
                # Hashed once here, not per version at each poll on the loop (a
                # review: a million labels, 40 versions, 260 ms a poll).
                known = (fingerprint, config, hash(config))
            except ModelConfigUnreadable:
                self._configs.pop(name, None)
                raise
            except ModelConfigError as exc:
                known = (fingerprint, exc, 0)
            self._configs[name] = known
        _, config_or_error, digest = known
        if isinstance(config_or_error, ModelConfigError):
            raise config_or_error
        return config_or_error, digest

    def index(self, *, ready_only: bool = False) -> list[IndexEntry]:
        entries: list[IndexEntry] = []
        # Only models not synced yet are looked at on disk: one of thousands of version
        # directories takes tens of ms to list, and this runs on the event loop.
        names = set(self._states) | {
            name for name in self._model_dirs() - set(self._states)
            if versions_on_disk(self.root / name)
        }
        for name in sorted(names):
            states = self._states.get(name, {})
            if not states and not ready_only:
                entries.append(IndexEntry(name))
            for version in sorted(states, key=int):
                if not ready_only or states[version].state == "READY":
                    entries.append(states[version])
        return entries

    def serving(self) -> list[ModelVersion]:
        return [v for by_version in self._serving.values() for v in by_version.values()]

    def workers(self) -> list[InferenceWorker]:
        return [v.worker for v in self.serving()]

    def refuse_waiting(self, reason: str) -> int:
        """``InferenceWorker.refuse_waiting`` on every version serving, and on those
        replaced and still draining: the requests failed."""
        retiring = [version.worker for version in self._retiring.values()]
        return sum(worker.refuse_waiting(reason) for worker in [*self.workers(), *retiring])

    def serving_summary(self) -> dict[str, list[str]]:
        return {name: self.versions(name) for name in sorted(self._serving)}

    async def wait_changed(self) -> None:
        """Return after the next change to the serving table or the index."""
        await self._changed.wait()

    # -- changes -----------------------------------------------------------------

    async def poll(self) -> None:
        """Bring every model in line with the directory (skipping explicit unloads), and
        return once each has been (start-up, SIGHUP)."""
        await asyncio.gather(*await self._start_syncs())

    async def _start_syncs(self) -> list[asyncio.Task[None]]:
        """Each model's sync in a task of its own, those under way left to run: one slow
        load held up every other model's changes, the default model's too, for as long
        as it took (a review: 20 s for a new version to serve, 28 s unready)."""
        listed = await asyncio.to_thread(_directories, self.root)
        names = set(self._serving) | set(self._states) | self._model_dirs(listed)
        syncs: list[asyncio.Task[None]] = []
        for name in sorted(names - self._unloaded):
            sync = self._syncing.get(name)
            if sync is None or sync.done():
                sync = self._syncing[name] = asyncio.get_running_loop().create_task(
                    self._sync_logged(name), name=f"model-sync-{name}", context=background_context()
                )
            syncs.append(sync)
        return syncs

    async def _sync_logged(self, name: str) -> None:
        """A model's sync, in a task of its own: its failure is logged and counted (the
        next poll runs it again; ``/ready`` names a default model not serving)."""
        try:
            await self._sync(name)
        except Exception as exc:  # one model's directory must not stop the others'
            log.error("model_poll_failed", model=name, error=repr(exc))
            self._telemetry.background_task_crashed("model-sync")

    async def load(self, model: str) -> None:
        """Load or reload ``model`` now (the repository extension's load)."""
        if not self._on_disk(model):
            raise ModelNotFound(f"model {model!r} is not in the repository")
        self._unloaded.discard(model)
        failures = await self._sync(model, again=True)
        if failures or model not in self._latest:
            # A reload that failed is the load's failure too (as Triton answers it),
            # though the previous load keeps serving (its reasons say so).
            reasons = failures or [e.reason for e in self._states.get(model, {}).values() if e.reason]
            raise ModelLoadFailed(
                f"failed to load model {model!r}: {'; '.join(reasons) or 'no loadable version'}"
            )

    async def unload(self, model: str) -> None:
        """Stop serving ``model`` (in-flight requests finish); polling leaves it alone."""
        if not self.known(model):
            raise ModelNotFound(f"model {model!r} is not in the repository")
        self._unloaded.add(model)
        async with self._lock_of(model):
            retired = list(self._serving.pop(model, {}).values())
            self._latest.pop(model, None)
            states = self._states.setdefault(model, {})
            for version in list(states):
                states[version] = IndexEntry(model, version, "UNAVAILABLE", "unloaded")
            self._notify()
        self._retire(retired)
        log.info("model_unloaded", model=model)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_poll_interval_s)
            try:
                await self._start_syncs()  # not waited for: the next poll comes on time
            except Exception as exc:  # a bad poll must not stop the next one
                log.error("model_poll_failed", error=repr(exc))

    def _in_repository(self, error: BaseException) -> str:
        """``error``'s message with the repository's place on disk as ``<repository>``:
        onnxruntime names the file it failed to load, and the reason reaches clients
        (a 503 names why a version is not serving)."""
        message = str(error)
        for root in {str(self.root.resolve()), str(self.root)}:
            message = message.replace(root, "<repository>")
        return message

    def _lock_of(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _sync(self, name: str, again: bool = False) -> list[str]:
        """Load what the directory and config of ``name`` want; the reasons of what
        failed (its config, a version's load). ``again``: versions that failed to load
        are tried again (an explicit load), forgotten under the model's lock, so that a
        poll failing them meanwhile cannot make this one skip them and say nothing."""
        async with self._lock_of(name):
            # Unloaded while this waited (a poll that listed it before): it stays so,
            # until an explicit load takes it off the list first.
            if self._closed or name in self._unloaded:
                return []
            if again:
                self._failed = {key: fp for key, fp in self._failed.items() if key[0] != name}
                self._configs.pop(name, None)  # an explicit load reads its config again
            model_dir = self.root / name
            current = dict(self._serving.get(name, {}))
            states = self._states.setdefault(name, {})
            # In a thread: thousands of version directories took 50-600 ms to list, a
            # stall of every request at each poll (a review).
            on_disk = await asyncio.to_thread(_versions_if_any, model_dir)
            try:
                config, config_hash = await asyncio.to_thread(self._config_of, name, model_dir)
            except ModelConfigError as exc:
                reason = self._in_repository(exc)
                self._report_failures(name, states, on_disk, current, reason)
                return [reason + ("; the previous load keeps serving" if current else "")]
            wanted = config.select(list(on_disk))
            failures: list[str] = []
            serving = dict(current)
            replaced: list[ModelVersion] = []
            for number in wanted:
                version = str(number)
                # Its model file as it was, and the config's values: a change of either
                # reloads it, a file's mode, links or times alone do not (a review:
                # ctime in it reloaded models at every backup run, their statistics
                # reset).
                fingerprint = (*file_fingerprint(on_disk[number]), config_hash)
                old = current.get(version)
                if old is not None and old.fingerprint == fingerprint:
                    # Its files as when it loaded (a mount back, say): a failure met
                    # meanwhile is over (a review: the index said "failed to load" for good).
                    self._failed.pop((name, version), None)
                    states[version] = IndexEntry(name, version, "READY")
                    continue
                if self._failed.get((name, version)) == fingerprint:
                    continue
                if old is None:
                    states[version] = IndexEntry(name, version, "LOADING")
                try:
                    loaded = await self._load_version(
                        name, version, on_disk[number], config, fingerprint
                    )
                except asyncio.CancelledError:  # closing: what this sync replaced closes too
                    if old is None:
                        states.pop(version, None)
                    self._retire(replaced)
                    raise
                except Exception as exc:
                    reason = f"failed to load version {version}: {self._in_repository(exc)}"
                    failures.append(reason + ("; the previous load keeps serving" if old else ""))
                    self._failed[(name, version)] = fingerprint
                    states[version] = IndexEntry(
                        name,
                        version,
                        "READY" if old else "UNAVAILABLE",
                        reason + ("; the previous load keeps serving" if old else ""),
                        failed=not old,
                    )
                    log.error("model_load_failed", model=name, version=version, error=str(exc))
                    self._telemetry.model_load_failed(name, version)
                    continue
                self._failed.pop((name, version), None)
                serving[version] = loaded
                states[version] = IndexEntry(name, version, "READY")
                if old is not None:
                    replaced.append(old)
                # Serving as soon as it is READY, not once the model's other versions
                # have loaded too (a review: READY in the index, 404 to a predict), and
                # closed with the rest if a close cancels this sync.
                self._publish(name, dict(serving))
            # Retire what the policy no longer wants, unless nothing wanted could load.
            keep_old = bool(wanted) and not any(str(n) in serving for n in wanted)
            for version in list(serving):
                if int(version) not in wanted and not keep_old:
                    replaced.append(serving.pop(version))
            for version, entry in list(states.items()):
                if version in serving:
                    if int(version) not in on_disk:
                        # Kept, its directory gone, since nothing the policy wants
                        # loads: said, in the index and once in the log (a review: it
                        # still read READY with no reason, and nothing was logged).
                        kept = IndexEntry(
                            name,
                            version,
                            "READY",
                            "removed from the repository; serving while no version the policy wants loads",
                        )
                        if entry != kept:
                            log.warning("model_version_kept", model=name, version=version, reason=kept.reason)
                        states[version] = kept
                    continue
                if int(version) not in on_disk:
                    states[version] = IndexEntry(
                        name, version, "UNAVAILABLE", "removed from the repository"
                    )
                elif entry.state == "READY" or (entry.failed and int(version) not in wanted):
                    # A failed version the policy no longer wants is not a failure to
                    # retry (503): it is not served (404).
                    states[version] = IndexEntry(
                        name, version, "UNAVAILABLE", "unloaded: not in the version policy"
                    )
            if not states and not on_disk:
                self._states.pop(name, None)
            self._publish(name, serving)
        self._retire(replaced)
        return failures

    def _report_failures(
        self,
        name: str,
        states: dict[str, IndexEntry],
        on_disk: Mapping[int, Path],
        current: Mapping[str, ModelVersion],
        reason: str,
    ) -> None:
        for number in on_disk:
            version = str(number)
            suffix = "; the previous load keeps serving" if version in current else ""
            state: State = "READY" if version in current else "UNAVAILABLE"
            entry = IndexEntry(name, version, state, reason + suffix, failed=state != "READY")
            if states.get(version) != entry:
                log.error("model_config_invalid", model=name, error=reason)
                if entry.failed:
                    self._telemetry.model_load_failed(name, version)
            states[version] = entry
        self._notify()

    async def _load_version(
        self, name: str, version: str, path: Path, config: ModelConfig, fingerprint: tuple[int, ...]
    ) -> ModelVersion:
        timeout_s = self.settings.model_load_timeout_s
        key = (name, version)
        if key in self._abandoned:
            raise ModelLoadTimedOut(
                f"its load before this one took longer than {timeout_s:g} s and has not "
                "ended yet: no other starts until it does"
            )
        warm_up = ort.RunOptions()
        loading = _in_daemon_thread(open_session, path, self.settings.inference_threads, warm_up)
        try:
            async with asyncio.timeout(timeout_s):
                # Shielded: the thread's outcome still comes to ``loading`` once it ends.
                session, inputs, outputs, batchable, known_good = await asyncio.shield(loading)
        except BaseException as exc:  # past its time, or cancelled (SIGTERM at start-up)
            warm_up.terminate = True  # the warm-up run ends, and its thread with it
            if not loading.done():
                self._abandoned[key] = (loading, fingerprint)
                loading.add_done_callback(partial(self._abandoned_load_ended, key, fingerprint))
            if isinstance(exc, TimeoutError):
                raise ModelLoadTimedOut(f"the load took longer than {timeout_s:g} s") from None
            raise
        max_batch_size = config.max_batch_size if batchable else 1
        worker = InferenceWorker(
            session,
            input_names=[spec.name for spec in inputs],
            output_names=[spec.name for spec in outputs],
            model=name,
            version=version,
            max_batch_size=max_batch_size,
            shares_batches=batchable,
            run_options=quiet_run_options(),
            known_good=known_good,
            max_queue_delay_s=config.max_queue_delay_ms / 1000,
            mailbox_size=self.settings.inference_mailbox_size,
            mailbox_bytes=self.settings.inference_mailbox_bytes,
            thread_niceness=self.settings.inference_thread_niceness,
            telemetry=self._telemetry,
        )
        worker.start()
        log.info("model_loaded", model=name, version=version, batchable=batchable)
        return ModelVersion(
            name,
            version,
            inputs,
            outputs,
            config,
            config.kind or guess_kind(outputs),
            batchable,
            max_batch_size,
            worker,
            fingerprint,
            Breaker(
                f"model {name}/{version}",
                fail_max=self.settings.model_breaker_fail_max,
                reset_s=self.settings.model_breaker_reset_s,
                exclude=(MailboxFull, DeadlineExpired, WorkerClosed, InputRefused),
            ),
        )

    def _abandoned_load_ended(
        self, key: tuple[str, str], fingerprint: tuple[int, ...], loading: asyncio.Future[Any]
    ) -> None:
        """The thread of a load given up on ended: its session is let go of, and the
        version may be loaded again: files changed since, refused while it ran, at the
        next poll (the files it timed out on, only once they change)."""
        self._abandoned.pop(key, None)
        if self._failed.get(key, fingerprint) != fingerprint:
            del self._failed[key]
        if not loading.cancelled() and loading.exception() is None:
            log.info("model_load_ended_late", model=key[0], version=key[1], detail="its session is dropped")

    def _publish(self, name: str, serving: dict[str, ModelVersion]) -> None:
        if serving:
            self._serving[name] = serving
            self._latest[name] = serving[max(serving, key=int)]
        else:
            self._serving.pop(name, None)
            self._latest.pop(name, None)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _retire(self, versions: list[ModelVersion]) -> None:
        for version in versions:
            task = asyncio.create_task(
                self._close_version(version), name=f"retire-{version.worker.name}"
            )
            self._retiring[task] = version
            task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("model_version_close_failed", task=task.get_name(), error=repr(task.exception()))
        # A closed worker is held in reference cycles (its cancelled task's error, whose
        # traceback holds the worker's frames), which only the collector frees; with its
        # thresholds raised (``server.tune_garbage_collector``) that came so seldom that
        # each retired version kept its session and model (a review: 120 unload/load
        # cycles of a 4 MB model took a process from 170 MB to 811 MB). Freed now: a
        # version retires at an unload or a changed file, not per request.
        gc.collect()

    async def _close_version(self, version: ModelVersion) -> None:
        await version.worker.close(drain_s=self.settings.shutdown_timeout_s / 2)
        log.info("model_version_closed", model=version.model, version=version.version)


def _directories(root: Path) -> set[str]:
    """The names of the directories in ``root``; none when it is no directory."""
    if not root.is_dir():
        return set()
    return {path.name for path in root.iterdir() if path.is_dir()}


def _changed_ns(path: Path) -> int:
    """``path``'s status change time (0 when it cannot be looked at)."""
    try:
        return path.stat().st_ctime_ns
    except OSError:
        return 0


def _versions_if_any(model_dir: Path) -> dict[int, Path]:
    return versions_on_disk(model_dir) if model_dir.is_dir() else {}


# The name of a model load's thread (``_in_daemon_thread``): the process exits past one
# still running (``service.process.server``).
LOADER_THREAD = "model-loader"


class ModelLoadTimedOut(Exception):
    """A model's load (session creation and warm-up run) did not end in time."""


def _in_daemon_thread(load: Callable[..., T], *args: object) -> asyncio.Future[T]:
    """``load(*args)`` in a thread of its own, a daemon: a load that does not end when
    told (creating a session cannot be interrupted, only its warm-up run) is left
    behind when it times out, and does not keep the process from exiting as an
    executor's thread would (joined at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        outcome: Callable[[], None]
        try:
            outcome = partial(future.set_result, load(*args))
        except BaseException as exc:  # handed to the awaiting task
            outcome = partial(future.set_exception, exc)
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the loop closed meanwhile: nobody waits any more
            pass

    threading.Thread(target=run, name=LOADER_THREAD, daemon=True).start()
    return future
