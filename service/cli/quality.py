"""``mlgate quality profile|report``: build feature profiles, look at drift.

``profile`` builds a source's or model's profile from a reference sample and writes it
where the service finds it (``<profiles_dir>/sources/<source>.profile.json`` or
``<model_repository>/<model>/profile.json``; a running service picks it up within
``MLGATE_PROFILES_POLL_INTERVAL_S`` or on SIGHUP). The sample is a file of records in
the ingest format - NDJSON, a JSON batch ``{"source": ..., "records": [...]}`` or a
JSON list of records, ``-`` for stdin - or the records of a source in the local log
(``--from-log``). At most ``--max-records`` records are used, the first ones read;
all must have the width of the first, others are skipped and counted.

``--output PATH`` writes the profile into PATH instead (through a symlink, into a FIFO
or ``/dev/stdout``); only the service's own files are replaced atomically.

``report`` asks a running service for the drift of a source or model and prints a
table, highest PSI first; ``--plot out.png`` also draws reference vs recent
distributions of the top features (needs matplotlib: ``pip install 'mlgate[plot]'``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import msgspec
import numpy as np

from mlgate.config import Settings
from mlgate.schemas.ingest import Record
from mlgate.schemas.quality import (
    MAX_EDGES,
    DriftReport,
    FeatureDrift,
    ProfileKind,
    report_decoder,
)
from mlgate.service.cli.arguments import whole_number
from mlgate.service.routes.quality import MAX_TOP
from mlgate.workers.quality.profile import (
    DEFAULT_BINS,
    DEFAULT_MARGIN,
    UnloadableProfile,
    build_profile,
)
from mlgate.workers.quality.profile_store import ProfileStore, profile_file_bytes
from mlgate.workers.sinks.local_log import read_log

DEFAULT_MAX_RECORDS = 100_000
PLOT_FEATURES = 6
BAR_WIDTH = 24


class _Batch(msgspec.Struct):
    records: list[Record]


class _Features(msgspec.Struct):
    features: list[float]


_records = msgspec.json.Decoder(list[Record])
_batch = msgspec.json.Decoder(_Batch)
_record = msgspec.json.Decoder(Record)
_json_features = msgspec.json.Decoder(_Features)
_msgpack_features = msgspec.msgpack.Decoder(_Features)


def add_parser(commands: Any) -> None:
    """The ``quality`` subcommand and its two actions."""
    quality = commands.add_parser("quality", help="feature profiles and drift reports")
    actions = quality.add_subparsers(dest="action", metavar="ACTION", required=True)

    profile = actions.add_parser("profile", help="build a profile from a reference sample")
    _target(profile)
    sample = profile.add_mutually_exclusive_group(required=True)
    sample.add_argument("--input", help="records in the ingest format (NDJSON or JSON); - for stdin")
    sample.add_argument("--from-log", action="store_true", help="records from the local log")
    profile.add_argument("--log-source", help="the source to read from the log (default --source)")
    profile.add_argument("--data-dir", help="data directory of the log (default MLGATE_DATA_DIR)")
    profile.add_argument("--on-violation", choices=("reject", "flag"), default="reject")
    profile.add_argument(
        "--bins", type=whole_number(2, MAX_EDGES + 1), default=DEFAULT_BINS,
        help=f"quantile bins per feature, 2 to {MAX_EDGES + 1} (default {DEFAULT_BINS})",
    )
    profile.add_argument(
        "--margin", type=_margin, default=DEFAULT_MARGIN,
        help="hard range: reference min/max widened by this share of the span (default 0.1)",
    )
    profile.add_argument("--feature-names", help="comma-separated names, one per feature")
    profile.add_argument(
        "--max-records", type=whole_number(1), default=DEFAULT_MAX_RECORDS,
        help=f"use at most this many records, the first read (default {DEFAULT_MAX_RECORDS})",
    )
    profile.add_argument("--output", help="write here instead of where the service looks")

    report = actions.add_parser("report", help="print the drift a running service measures")
    _target(report)
    report.add_argument("--url", help="the service (default http://127.0.0.1:MLGATE_PORT)")
    report.add_argument("--key", help="API key with the quality or admin scope (default MLGATE_API_KEY)")
    report.add_argument(
        "--top", type=whole_number(0, MAX_TOP), default=20,
        help=f"features to list, 0 to {MAX_TOP} (default 20)",
    )
    report.add_argument("--plot", type=Path, metavar="PNG", help="draw the top features' distributions")
    report.add_argument(
        "--plot-features", type=whole_number(1), default=PLOT_FEATURES,
        help=f"features drawn with --plot, at least 1 (default {PLOT_FEATURES})",
    )


def _margin(text: str) -> float:
    # nan or inf would write "min": null, a profile the service refuses to load; a
    # negative margin narrows the range inside the reference itself (min above max).
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text!r}")
    return value


def _target(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--source", help="a source's profile")
    target.add_argument("--model", help="a model's profile")


def run(settings: Settings, args: argparse.Namespace) -> int:
    kind: ProfileKind = "source" if args.source else "model"
    name: str = args.source or args.model
    try:
        if args.action == "profile":
            return _profile(args, settings, kind, name)
        return _report(args, settings, kind, name)
    except UnloadableProfile as exc:  # nothing written: the service could not load it
        print(f"mlgate quality: {exc}; nothing written", file=sys.stderr)
        return 2
    except (OSError, ValueError, msgspec.DecodeError) as exc:
        print(f"mlgate: {exc}", file=sys.stderr)
        return 1


# -- profile ----------------------------------------------------------------------------


def _profile(args: argparse.Namespace, settings: Settings, kind: ProfileKind, name: str) -> int:
    store = ProfileStore(settings.profiles_dir, settings.model_repository)
    store.path_of(kind, name)  # a name that cannot be a file fails before any reading
    if args.from_log:
        log_source = args.log_source or args.source
        if not log_source:
            raise ValueError("--from-log with --model needs --log-source")
        directory = Path(args.data_dir or settings.data_dir) / "log"
        if not directory.is_dir():
            raise ValueError(f"no local log at {directory}")
        rows: Iterable[list[float]] = _log_features(directory, log_source)
        matrix, skipped = _matrix(rows, args.max_records)
    elif args.input == "-":
        matrix, skipped = _matrix(_file_features(sys.stdin.buffer), args.max_records)
    else:
        with open(args.input, "rb") as file:
            matrix, skipped = _matrix(_file_features(file), args.max_records)
    names = args.feature_names.split(",") if args.feature_names else None
    profile = build_profile(
        matrix, kind=kind, name=name, on_violation=args.on_violation, bins=args.bins,
        margin=args.margin, feature_names=names,
    )
    if args.output:
        # Written into what is there, as any tool's output: through a symlink, into a
        # FIFO or /dev/stdout. Only where the service reads is replaced atomically.
        data = profile_file_bytes(profile)  # refused before the file is opened
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as file:
            file.write(data)
    else:
        path = store.save(profile)
    note = f", {skipped} records of another width or not finite skipped" if skipped else ""
    # With --output the summary goes to stderr: stdout may be the profile itself
    # (``--output /dev/stdout``), which a line printed after it would corrupt.
    print(
        f"profile of {kind} {name}: {matrix.shape[0]} records x {matrix.shape[1]} features, "
        f"on_violation={args.on_violation}{note} -> {path}",
        file=sys.stderr if args.output else sys.stdout,
    )
    return 0


def _file_features(file: IO[bytes]) -> Iterator[list[float]]:
    """The features of the records in ``file``, read as they are used: NDJSON line by
    line, so ``--max-records`` bounds what is read (a review: a 520 MB file was read
    and decoded whole for 10 records, 2.1 GB); a JSON document (an array of records or
    a batch) whole."""
    number, first = 1, file.readline()
    while first and not first.strip():
        number, first = number + 1, file.readline()
    try:
        features = _record.decode(first).features
    except msgspec.DecodeError:  # no record of its own on the first line: a document
        yield from _document_features(first + file.read())
        return
    yield features
    for line_number, line in enumerate(file, start=number + 1):
        if line.strip():
            try:
                yield _record.decode(line).features
            except msgspec.DecodeError as exc:
                raise ValueError(f"line {line_number}: {exc}") from None


def _document_features(data: bytes) -> Iterator[list[float]]:
    head = data.lstrip()[:1]
    if head == b"[":
        yield from (record.features for record in _records.decode(data))
        return
    try:
        batch = _batch.decode(data)
    except msgspec.DecodeError:  # more than one document: NDJSON
        for number, line in enumerate(data.splitlines(), start=1):
            if line.strip():
                try:
                    yield _record.decode(line).features
                except msgspec.DecodeError as exc:
                    raise ValueError(f"line {number}: {exc}") from None
        return
    yield from (record.features for record in batch.records)


def _log_features(directory: Path, source: str) -> Iterator[list[float]]:
    wanted = source.encode()
    for entry in read_log(directory):
        record = entry.record
        if dict(record.headers).get("source") != wanted:
            continue
        try:
            yield _json_features.decode(record.value).features
        except msgspec.DecodeError:
            yield _msgpack_features.decode(record.value).features


def _matrix(rows: Iterable[list[float]], limit: int) -> tuple[np.ndarray, int]:
    if limit < 1:
        raise ValueError("--max-records must be at least 1")
    kept: list[list[float]] = []
    skipped = 0
    width = None
    for features in rows:
        if width is None:
            width = len(features)
        if len(features) != width or not all(map(math.isfinite, features)):
            skipped += 1
            continue
        kept.append(features)
        if len(kept) >= limit:
            break
    if not kept:
        raise ValueError("the reference sample holds no usable records")
    return np.array(kept, dtype=np.float64), skipped


# -- report -----------------------------------------------------------------------------


def _report(args: argparse.Namespace, settings: Settings, kind: ProfileKind, name: str) -> int:
    base = (args.url or f"http://127.0.0.1:{settings.port}").rstrip("/")
    collection = "sources" if kind == "source" else "models"
    url = f"{base}/api/v2/quality/{collection}/{urllib.parse.quote(name, safe='')}?top={args.top}"
    headers = {"Accept": "application/json"}
    key = args.key or os.environ.get("MLGATE_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as answer:
            report = report_decoder.decode(answer.read())
    except urllib.error.HTTPError as exc:
        detail = _problem_detail(exc.read())
        print(f"mlgate: {url}: {exc.code} {detail}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"mlgate: cannot reach {base}: {exc.reason}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.plot is not None:
        return plot_report(report, args.plot, args.plot_features)
    return 0


def _problem_detail(body: bytes) -> str:
    try:
        problem = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body[:200].decode(errors="replace")
    if isinstance(problem, dict):
        return str(problem.get("detail") or problem.get("title") or problem.get("error") or "")
    return ""


def format_report(report: DriftReport) -> str:
    window = report.window
    if window.complete:
        covers = f"last complete window of {window.records} records, ended {window.ended_at}"
    elif window.records:
        covers = f"window being filled: {window.records} of {window.size} records (no window complete yet)"
    else:
        covers = "no records observed yet"
    lines = [
        f"{report.kind} {report.name}: profile of {report.profile_created_at}, "
        f"{report.reference_count} reference records, {report.features} features, "
        f"on_violation={report.on_violation}",
        f"scores: {covers}; {window.windows_completed} windows completed, "
        f"{window.pending_records} records pending (tumbling windows of {window.size})",
        f"records: {report.records_observed} observed, {report.records_dropped} dropped, "
        f"{report.records_rejected} rejected, {report.records_flagged} flagged",
        f"PSI threshold {report.psi_threshold:g}: {report.features_over_threshold} of "
        f"{report.features} features over",
    ]
    if not report.top:
        return "\n".join(lines)
    width = max(len("feature"), *(len(f.name) for f in report.top))
    scale = max(report.psi_threshold * 2, max(f.psi for f in report.top))
    lines += ["", f"{'feature':<{width}}  {'psi':>8}  {'out of range':>12}"]
    for feature in report.top:
        bar = "#" * max(0, round(BAR_WIDTH * feature.psi / scale))
        lines.append(
            f"{feature.name:<{width}}  {feature.psi:8.4f}  {feature.out_of_range_share:12.2%}  "
            f"{'DRIFT' if feature.over_threshold else '':5}  {bar}".rstrip()
        )
    return "\n".join(lines)


def plot_report(report: DriftReport, path: Path, count: int) -> int:
    try:
        import matplotlib
    except ImportError:
        print("mlgate: --plot needs matplotlib: pip install 'mlgate[plot]'", file=sys.stderr)
        return 1
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    features = report.top[: max(count, 1)]
    if not features:
        print("mlgate: nothing to plot yet: no records observed", file=sys.stderr)
        return 1
    columns = min(3, len(features))
    rows = math.ceil(len(features) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for axis, feature in zip(axes.flat, features, strict=False):
        _plot_feature(axis, feature)
    for axis in list(axes.flat)[len(features) :]:
        axis.set_visible(False)
    figure.suptitle(f"{report.kind} {report.name}: reference vs last {report.window.records} records")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"plot of {len(features)} features -> {path}")
    return 0


def _plot_feature(axis: Any, feature: FeatureDrift) -> None:
    positions = np.arange(len(feature.reference))
    axis.bar(positions - 0.2, feature.reference, width=0.4, label="reference")
    axis.bar(positions + 0.2, feature.recent, width=0.4, label="recent")
    labels = [f"<{feature.edges[0]:.3g}"] + [f">={edge:.3g}" for edge in feature.edges]
    axis.set_xticks(positions, labels, rotation=45, ha="right", fontsize=7)
    axis.set_ylabel("share")
    state = "DRIFT" if feature.over_threshold else "ok"
    axis.set_title(f"{feature.name}: psi {feature.psi:.3f} ({state})", fontsize=9)
    axis.legend(fontsize=7)
