"""ProfileStore: where feature profiles live on disk, and the set currently in force.

Source profiles are ``<profiles_dir>/sources/<source>.profile.json``; model profiles
``<model_repository>/<model>/profile.json``, next to the model's versions. The name
comes from the path. ``refresh()`` rescans both places (blocking: call it off the
event loop) and swaps in a new mapping at once, re-reading only files whose size or
mtime changed; lookups on the hot path are one dict access and never touch the disk.
A profile that fails to load is logged and the one it was meant to replace stays in
force, so a half-written or broken file never switches a check off.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import msgspec
import structlog

from mlgate.schemas.quality import ProfileKind, QualityProfile, encode_profile, profile_decoder
from mlgate.workers.quality.profile import CompiledProfile

log = structlog.get_logger("mlgate.profiles")

SOURCE_SUFFIX = ".profile.json"
# Source names as the ingest schema allows them, minus a leading dot (no "..", no hidden files).
SAFE_NAME = re.compile(r"^[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}$")
MODEL_PROFILE = "profile.json"


@dataclass(frozen=True, slots=True)
class _Loaded:
    signature: tuple[int, int]  # (size, mtime_ns)
    profile: CompiledProfile


class ProfileStore:
    def __init__(self, profiles_dir: str | Path, model_repository: str | Path) -> None:
        self.profiles_dir = Path(profiles_dir)
        self.model_repository = Path(model_repository)
        self._loaded: dict[Path, _Loaded] = {}
        self._current: dict[tuple[ProfileKind, str], CompiledProfile] = {}

    def get(self, kind: ProfileKind, name: str) -> CompiledProfile | None:
        return self._current.get((kind, name))

    def source(self, name: str) -> CompiledProfile | None:
        return self._current.get(("source", name))

    def model(self, name: str) -> CompiledProfile | None:
        return self._current.get(("model", name))

    def path_of(self, kind: ProfileKind, name: str) -> Path:
        if not SAFE_NAME.match(name):
            raise ValueError(f"{name!r} cannot name a profile: 1-128 of A-Z a-z 0-9 . _ : -, not first .")
        if kind == "source":
            return self.profiles_dir / "sources" / f"{name}{SOURCE_SUFFIX}"
        return self.model_repository / name / MODEL_PROFILE

    def save(self, profile: QualityProfile) -> Path:
        """Write a profile where the store finds it, atomically; its path."""
        CompiledProfile.compile(profile)  # refuse to write what could not be loaded
        path = self.path_of(profile.kind, profile.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        scratch.write_bytes(encode_profile(profile) + b"\n")
        os.replace(scratch, path)
        return path

    def refresh(self) -> None:
        """Rescan the directories and swap in what is there now. Blocking."""
        found: dict[tuple[ProfileKind, str], Path] = {}
        sources = self.profiles_dir / "sources"
        if sources.is_dir():
            for path in sources.glob(f"*{SOURCE_SUFFIX}"):
                found[("source", path.name.removesuffix(SOURCE_SUFFIX))] = path
        if self.model_repository.is_dir():
            for path in self.model_repository.glob(f"*/{MODEL_PROFILE}"):
                found[("model", path.parent.name)] = path
        loaded: dict[Path, _Loaded] = {}
        current: dict[tuple[ProfileKind, str], CompiledProfile] = {}
        for (kind, name), path in found.items():
            entry = self._load(kind, name, path)
            if entry is not None:
                loaded[path] = entry
                current[(kind, name)] = entry.profile
        for key, profile in current.items():
            if self._current.get(key) is not profile:
                log.info("profile_loaded", kind=key[0], name=key[1], features=profile.n_features,
                         on_violation=profile.profile.on_violation)
        for kind, name in self._current.keys() - current.keys():
            log.info("profile_removed", kind=kind, name=name)
        self._loaded, self._current = loaded, current

    def _load(self, kind: ProfileKind, name: str, path: Path) -> _Loaded | None:
        previous = self._loaded.get(path)
        try:
            stat = path.stat()
            signature = (stat.st_size, stat.st_mtime_ns)
            if previous is not None and previous.signature == signature:
                return previous
            profile = profile_decoder.decode(path.read_bytes())
            if profile.kind != kind:
                raise ValueError(f"a {profile.kind} profile where a {kind} profile belongs")
            return _Loaded(signature, CompiledProfile.compile(profile))
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            log.error("profile_load_failed", kind=kind, name=name, path=str(path), error=str(exc))
            return previous
