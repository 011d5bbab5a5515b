"""ProfileStore: where feature profiles live on disk, and the set currently in force.

Source profiles are ``<profiles_dir>/sources/<source>.profile.json``; model profiles
``<model_repository>/<model>/profile.json``, next to the model's versions. The name
comes from the path. ``refresh()`` rescans both places (blocking: call it off the
event loop) and swaps in a new mapping at once, re-reading only files whose size or
mtime changed; lookups on the hot path are one dict access and never touch the disk.
A profile that fails to load is logged (once per change of the file) and the one it
was meant to replace stays in force, so a half-written or broken file never switches
a check off. With no earlier version held (a fresh process, or a new file) the
profile is ``unreadable``: its checks cannot run, and the ingest of its source is
refused until it loads (``service.ingest.quality_screen``) rather than let through
unchecked. A profiles directory that is there but cannot be listed (its permissions,
an I/O error) switches nothing off either: the profiles known in it are read again by
name (an earlier version staying in force if that fails too), the directory is logged
(once per change) and counted as unreadable. A sources directory that cannot be listed
and was never listed by this store (a fresh process) leaves no profile to know of:
every source is then ``unreadable`` (its ingest refused) until a listing succeeds. A
model repository that cannot be listed only costs drift (a model's profile refuses
nothing): logged and counted.

What is in force is one object (``_InForce``) swapped in one assignment, so a reader
never sees the profiles of one refresh with the unreadable set of another.

After each refresh the store tells its watchers what changed (``ProfileChanges``):
profiles removed or replaced, loads that failed anew, and how many files are there
but cannot be loaded. Watchers run in the refresh's thread.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
import structlog

from mlgate.schemas.quality import ProfileKind, QualityProfile, encode_profile, profile_decoder
from mlgate.workers.quality.profile import CompiledProfile, UnloadableProfile
from mlgate.workers.regular_file import read_regular

log = structlog.get_logger("mlgate.profiles")

SOURCE_SUFFIX = ".profile.json"
# The largest profile file read (4,096 features of 1,000 bins take about 170 MB).
MAX_PROFILE_BYTES = 256 * 1024 * 1024
# Source names as the ingest schema allows them, minus a leading dot (no "..", no hidden files).
SAFE_NAME = re.compile(r"^[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}$")
MODEL_PROFILE = "profile.json"


@dataclass(frozen=True, slots=True)
class _Loaded:
    signature: tuple[int, int]  # (size, mtime_ns)
    profile: CompiledProfile


ProfileKey = tuple[ProfileKind, str]
# (the profile in force or None, whether its file is there but cannot be loaded with no
# earlier version in force)
ProfileState = tuple[CompiledProfile | None, bool]
NO_PROFILE: ProfileState = (None, False)


@dataclass(frozen=True, slots=True)
class _InForce:
    """What one refresh put in force; replaced whole, never changed."""

    profiles: dict[ProfileKey, CompiledProfile]
    # every profile loaded or unreadable: (profile or None, unreadable)
    states: dict[ProfileKey, ProfileState]
    # the state of a source not in ``states``: unreadable while its directory cannot be
    # listed and never was (which profiles are there is not known)
    other_sources: ProfileState = NO_PROFILE


@dataclass(frozen=True, slots=True)
class ProfileChanges:
    """What one refresh changed."""

    # (kind, name, the profile that was in force, the one now or None if removed)
    retired: tuple[tuple[ProfileKind, str, CompiledProfile, CompiledProfile | None], ...]
    # profiles whose file failed to load this time, for the first time in its state
    failed: tuple[ProfileKey, ...]
    # files there that cannot be loaded, per kind (an earlier version held or not),
    # plus one for a directory of that kind there that cannot be listed
    unreadable: Mapping[ProfileKind, int]


ProfileWatcher = Callable[[ProfileChanges], None]


class ProfileStore:
    def __init__(self, profiles_dir: str | Path, model_repository: str | Path) -> None:
        self.profiles_dir = Path(profiles_dir)
        self.model_repository = Path(model_repository)
        self._loaded: dict[Path, _Loaded] = {}
        self._in_force = _InForce(profiles={}, states={})
        # The profile files the last refresh found (listed, or known from before).
        self._found: dict[ProfileKey, Path] = {}
        # path -> (signature, error) of its last failed load: logged once per change
        self._failures: dict[Path, tuple[tuple[int, int] | None, str]] = {}
        # kind -> the error listing its directory last failed with: logged once per change
        self._unlisted: dict[ProfileKind, str] = {}
        # Whether the sources directory was ever listed (or found not there): until then,
        # one that cannot be listed may hold any source's profile.
        self._sources_listed = False
        self._watchers: list[ProfileWatcher] = []

    def watch(self, watcher: ProfileWatcher) -> None:
        """Call ``watcher`` after every refresh, in the refresh's thread."""
        self._watchers.append(watcher)

    def get(self, kind: ProfileKind, name: str) -> CompiledProfile | None:
        return self._in_force.profiles.get((kind, name))

    def unreadable(self, kind: ProfileKind, name: str) -> bool:
        """Whether this profile's file is there but cannot be loaded, and no earlier
        version of it is in force: its checks cannot run."""
        in_force = self._in_force
        default = in_force.other_sources if kind == "source" else NO_PROFILE
        return in_force.states.get((kind, name), default)[1]

    def source_state(self, name: str) -> ProfileState:
        """A source's profile in force (or None) and whether it is unreadable, read
        from one refresh (one dict lookup)."""
        in_force = self._in_force
        return in_force.states.get(("source", name), in_force.other_sources)

    def source(self, name: str) -> CompiledProfile | None:
        return self._in_force.profiles.get(("source", name))

    def model(self, name: str) -> CompiledProfile | None:
        return self._in_force.profiles.get(("model", name))

    def path_of(self, kind: ProfileKind, name: str) -> Path:
        if not SAFE_NAME.match(name):
            raise ValueError(f"{name!r} cannot name a profile: 1-128 of A-Z a-z 0-9 . _ : -, not first .")
        if kind == "source":
            return self.profiles_dir / "sources" / f"{name}{SOURCE_SUFFIX}"
        return self.model_repository / name / MODEL_PROFILE

    def save(self, profile: QualityProfile, path: Path | None = None) -> Path:
        """Write a profile where the store finds it (or at ``path``), atomically; its
        path. A profile that could not be loaded back (a number that is not finite,
        say: ``NonFiniteProfile``) is refused and nothing is written."""
        data = profile_file_bytes(profile)
        path = path if path is not None else self.path_of(profile.kind, profile.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        scratch.write_bytes(data)
        os.replace(scratch, path)
        return path

    def refresh(self) -> None:
        """Rescan the directories and swap in what is there now. Blocking."""
        found = self._scan()
        loaded: dict[Path, _Loaded] = {}
        current: dict[ProfileKey, CompiledProfile] = {}
        failures: dict[Path, tuple[tuple[int, int] | None, str]] = {}
        failed: list[ProfileKey] = []
        unreadable: set[ProfileKey] = set()
        broken: dict[ProfileKind, int] = {"source": 0, "model": 0}
        there: dict[ProfileKey, Path] = {}  # loaded, or failed to: known next time
        for (kind, name), path in found.items():
            try:
                entry = self._load(kind, name, path, listed=kind not in self._unlisted)
            except _LoadFailed as failure:
                there[(kind, name)] = path
                failures[path] = failure.state
                broken[kind] += 1
                if self._failures.get(path) != failure.state:
                    log.error("profile_load_failed", kind=kind, name=name, path=str(path),
                              error=failure.state[1], kept_previous=failure.previous is not None)
                    failed.append((kind, name))
                entry = failure.previous
                if entry is None:
                    unreadable.add((kind, name))
            if entry is not None:
                there[(kind, name)] = path
                loaded[path] = entry
                current[(kind, name)] = entry.profile
        for kind in self._unlisted:
            broken[kind] += 1  # the directory itself
        before_in_force = self._in_force.profiles
        for key, profile in current.items():
            if before_in_force.get(key) is not profile:
                log.info("profile_loaded", kind=key[0], name=key[1], features=profile.n_features,
                         on_violation=profile.profile.on_violation)
        for kind, name in before_in_force.keys() - current.keys():
            log.info("profile_removed", kind=kind, name=name)
        retired = tuple(
            (kind, name, before, current.get((kind, name)))
            for (kind, name), before in before_in_force.items()
            if current.get((kind, name)) is not before
        )
        states: dict[ProfileKey, ProfileState] = {key: (p, False) for key, p in current.items()}
        states.update((key, (None, True)) for key in unreadable)
        self._loaded, self._failures, self._found = loaded, failures, there
        # Sources unknown: a sources directory that cannot be listed, never listed before.
        blind = "source" in self._unlisted and not self._sources_listed
        self._in_force = _InForce(  # one swap
            profiles=current, states=states, other_sources=(None, True) if blind else NO_PROFILE
        )
        changes = ProfileChanges(retired=retired, failed=tuple(failed), unreadable=broken)
        for watcher in self._watchers:
            try:
                watcher(changes)
            except Exception:  # a watcher's bug must not stop the profiles changing
                log.exception("profile_watcher_failed")

    def _scan(self) -> dict[ProfileKey, Path]:
        """The profile files there. Of a directory there that cannot be listed, the
        files found in it before (to be read again by name); logged once per change."""
        found: dict[ProfileKey, Path] = {}
        unlisted: dict[ProfileKind, str] = {}
        sources = self.profiles_dir / "sources"
        try:
            listed = _listing(sources)
            for entry in listed or ():
                if entry.name.endswith(SOURCE_SUFFIX):
                    found[("source", entry.name.removesuffix(SOURCE_SUFFIX))] = Path(entry.path)
            # Listed as it is: a directory not there is known to hold no profile only
            # while it is not there (a review: one that then appeared unlistable was
            # taken for listed, and every source went unchecked).
            self._sources_listed = listed is not None
        except OSError as exc:
            unlisted["source"] = str(exc)
        try:
            for entry in _listing(self.model_repository) or ():
                candidate = Path(entry.path) / MODEL_PROFILE
                if _is_dir(entry) and _may_exist(candidate):
                    found[("model", entry.name)] = candidate
        except OSError as exc:
            unlisted["model"] = str(exc)
        for kind, error in unlisted.items():
            known = {key: path for key, path in self._found.items() if key[0] == kind}
            found.update(known)
            if self._unlisted.get(kind) != error:
                directory = sources if kind == "source" else self.model_repository
                log.error("profiles_dir_unreadable", kind=kind, path=str(directory), error=error,
                          kept=sorted(name for _, name in known),
                          refusing_every_source=kind == "source" and not self._sources_listed)
        for kind in self._unlisted.keys() - unlisted.keys():
            log.info("profiles_dir_readable", kind=kind)
        self._unlisted = unlisted
        return found

    def _load(self, kind: ProfileKind, name: str, path: Path, listed: bool = True) -> _Loaded | None:
        """The profile at ``path``; None if the file went away since the scan (an
        absent file is no profile), unless its directory could not be ``listed``: then
        the earlier version stays (a directory linked to a mount gone cannot tell its
        files removed); ``_LoadFailed`` if it cannot be loaded."""
        previous = self._loaded.get(path)
        signature: tuple[int, int] | None = None
        try:
            info = path.stat()
            signature = (info.st_size, info.st_mtime_ns)
            if previous is not None and previous.signature == signature:
                return previous
            profile = profile_decoder.decode(read_regular(path, MAX_PROFILE_BYTES, "a profile file"))
            if profile.kind != kind:
                raise ValueError(f"a {profile.kind} profile where a {kind} profile belongs")
            return _Loaded(signature, CompiledProfile.compile(profile))
        except FileNotFoundError:
            return None if listed else previous
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            raise _LoadFailed((signature, str(exc)), previous) from exc


def profile_file_bytes(profile: QualityProfile) -> bytes:
    """The bytes of ``profile``'s file. A profile that could not be loaded back (a
    number that is not finite: ``NonFiniteProfile``; past a limit of its wire type:
    ``UnloadableProfile``) is refused."""
    CompiledProfile.compile(profile)
    data = encode_profile(profile) + b"\n"
    try:  # held to the wire type's limits as a load would (a review: 2,000 bins written)
        profile_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise UnloadableProfile(f"the profile would not load: {exc}") from None
    return data


def _listing(directory: Path) -> list[os.DirEntry[str]] | None:
    """The entries of ``directory``; None if it is not there (or not a directory).
    ``OSError`` if it is there but cannot be listed: ``Path.glob`` would say "empty"."""
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError) as exc:
        if _leads_nowhere(directory):
            # There, and not a directory to list: a symbolic link to nothing (a mount
            # gone) or a file, itself or a folder above it. A review: such a
            # ``sources`` (then such a profiles directory) was taken for no profiles,
            # and every source's checks went off.
            raise OSError(exc.errno, f"{exc.strerror}: the path is there (a link to nothing, or a file)",
                          str(directory)) from exc
        return None


def _leads_nowhere(path: Path) -> bool:
    """Whether ``path``, not there as a directory, is there in some other form, or a
    folder above it is a link to nothing or a file: the first of them that is there
    at all decides."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate == path or not os.path.isdir(candidate)
    return False


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _may_exist(path: Path) -> bool:
    """False only if ``path`` is known not to be there: one that cannot be looked at
    (a model directory that cannot be searched) is tried, and fails to load."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


class _LoadFailed(Exception):
    def __init__(self, state: tuple[tuple[int, int] | None, str], previous: _Loaded | None) -> None:
        super().__init__(state[1])
        self.state = state  # (the file's signature, the error)
        self.previous = previous
