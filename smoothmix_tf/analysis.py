"""Certification results: read/write the reference TSV, ACR, certified accuracy, tables and plots.

Implements the metrics of Cohen et al. 2019 (paper §4, Table 2):

- approximate certified accuracy at radius r = fraction of rows where CERTIFY did not abstain, was
  correct, and returned radius ≥ r;
- ACR = mean over rows of radius · 1[correct] (abstentions and errors count 0).

The file format is the one written by Cohen et al.'s ``certify.py`` and read by the reference tools:
a header ``idx\\tlabel\\tpredict\\tradius\\tcorrect\\ttime`` then one row per input,
``predict = -1`` for abstain, the radius written with ``{:.3}`` and the elapsed time as
``str(datetime.timedelta)`` (``0:00:04.246721``). PREDICT runs use the same layout without the
radius column.

Outputs are crash-safe: :class:`TsvWriter` writes and flushes one row per input and resumes a
partial file; whole files (tables, JSON, plots) are written to a temporary file and renamed into
place.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import io
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smoothmix_tf._checks import check_positive, fail
from smoothmix_tf.atomic import atomic_write_bytes, atomic_write_text  # noqa: F401 (re-exported)

CERTIFY_COLUMNS: tuple[str, ...] = ("idx", "label", "predict", "radius", "correct", "time")
PREDICT_COLUMNS: tuple[str, ...] = ("idx", "label", "predict", "correct", "time")
# sequential certification (docs/sequential.md): CERTIFY's columns + estimation samples used
SEQUENTIAL_COLUMNS: tuple[str, ...] = CERTIFY_COLUMNS + ("samples",)
ABSTAIN = -1
DEFAULT_RADII: tuple[float, ...] = tuple(0.25 * i for i in range(12))  # Table 2: 0.00 ... 2.75
RADIUS_FORMAT = ".3"  # Cohen et al.'s certify.py writes "{:.3}".format(radius)


# ------------------------------------------------------------------------------------------------
# the result container
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class CertificationResult:
    """One certification run: one entry per certified input (arrays of equal length).

    ``predict`` is -1 where CERTIFY abstained; ``time`` is the elapsed seconds per input;
    ``source`` (optional) names the file the rows came from, for error messages.
    """

    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray
    correct: np.ndarray
    time: np.ndarray
    source: str | None = None

    def __post_init__(self) -> None:
        self.idx = np.asarray(self.idx, dtype=np.int64).reshape(-1)
        self.label = np.asarray(self.label, dtype=np.int64).reshape(-1)
        self.predict = np.asarray(self.predict, dtype=np.int64).reshape(-1)
        self.radius = np.asarray(self.radius, dtype=np.float64).reshape(-1)
        self.correct = np.asarray(self.correct, dtype=np.int64).reshape(-1)
        self.time = np.asarray(self.time, dtype=np.float64).reshape(-1)
        lengths = {name: len(getattr(self, name)) for name in CERTIFY_COLUMNS}
        if len(set(lengths.values())) != 1:
            raise fail(f"CertificationResult columns have different lengths {lengths}",
                       "Pass one entry per certified input in every column.")

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def certified(self) -> np.ndarray:
        """Boolean mask: CERTIFY did not abstain and was correct (radius not yet thresholded)."""
        return (self.predict != ABSTAIN) & (self.correct == 1)

    def _describe(self) -> str:
        return f"certification result from {self.source}" if self.source else "certification result"


def _require_rows(result: CertificationResult) -> None:
    if not isinstance(result, CertificationResult):
        raise fail(f"expected a CertificationResult, got {type(result).__name__}",
                   "Load one with smoothmix_tf.analysis.load_certification(path).")
    if len(result) == 0:
        raise fail(f"the {result._describe()} has no rows, so ACR and certified accuracy are "
                   "undefined", "Certify at least one input (or point at the finished TSV file).")


# ------------------------------------------------------------------------------------------------
# metrics (paper §4)
# ------------------------------------------------------------------------------------------------
def average_certified_radius(result: CertificationResult) -> float:
    """ACR = (1/|D|) Σ radius · 1[correct] over the rows present (abstain/wrong count 0)."""
    _require_rows(result)
    return float(np.mean(np.where(result.certified, result.radius, 0.0)))


def certified_accuracy(result: CertificationResult,
                       radii: float | Sequence[float] | np.ndarray = DEFAULT_RADII) -> np.ndarray:
    """Approximate certified accuracy at each radius r: fraction of rows that are correct,
    not abstained and have radius ≥ r (at r = 0: the smoothed classifier's clean accuracy).

    Returns an array of fractions in [0, 1] with the shape of ``radii``.
    """
    _require_rows(result)
    radii_array = np.asarray(radii, dtype=np.float64)
    if not np.all(np.isfinite(radii_array)):
        raise fail(f"radii must be finite numbers, got {radii!r}", "Pass radii like 0, 0.25, 0.5.")
    certified_radii = np.sort(result.radius[result.certified])
    # number of certified rows with radius >= r, for every r at once
    counts = len(certified_radii) - np.searchsorted(certified_radii, radii_array, side="left")
    return counts / len(result)


# ------------------------------------------------------------------------------------------------
# field formatting and parsing
# ------------------------------------------------------------------------------------------------
_TIMEDELTA = re.compile(r"(?:(-?\d+) days?, )?(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)")


def format_seconds(seconds: float | datetime.timedelta) -> str:
    """Elapsed time as Cohen et al. write it: ``str(datetime.timedelta(seconds=...))``."""
    if isinstance(seconds, datetime.timedelta):
        return str(seconds)
    return str(datetime.timedelta(seconds=float(seconds)))


def parse_seconds(text: str) -> float:
    """Seconds from ``H:MM:SS[.ffffff]`` (``str(timedelta)``, days allowed) or a plain float."""
    text = text.strip()
    match = _TIMEDELTA.fullmatch(text)
    if match:
        days, hours, minutes, seconds = match.groups()
        return (int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60
                + float(seconds))
    value = float(text)  # ValueError for anything else
    if not math.isfinite(value):
        raise ValueError(f"time {text!r} is not finite")
    return value


def _format_int(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"{value!r} is not an integer")
    return str(int(number))


def _format_field(column: str, value: Any, radius_format: str) -> str:
    if column in ("idx", "label", "predict", "correct", "samples"):
        return _format_int(value)
    if column == "radius":
        return format(float(value), radius_format)
    if column == "time":
        return format_seconds(value)
    text = str(value)
    if "\t" in text or "\n" in text:
        raise ValueError(f"{value!r} contains a tab or a newline")
    return text


def format_row(columns: Sequence[str], values: Sequence[Any],
               radius_format: str = RADIUS_FORMAT) -> str:
    """One TSV line (with its newline) in the reference format: integers as integers, the radius
    with ``{:.3}``, the time as ``str(timedelta)``."""
    if len(values) != len(columns):
        raise fail(f"got {len(values)} values for the {len(columns)} columns {list(columns)}",
                   "Pass one value per column, in order.")
    try:
        fields = [_format_field(c, v, radius_format) for c, v in zip(columns, values)]
    except (TypeError, ValueError) as error:
        raise fail(f"cannot write row {list(values)!r} for columns {list(columns)}: {error}",
                   "Pass integers for idx/label/predict/correct, a float radius and the elapsed "
                   "seconds (or a timedelta) as time.") from None
    return "\t".join(fields) + "\n"


def _parse_int(text: str) -> int:
    return int(text)


def _parse_correct(text: str) -> int:
    value = int(text)
    if value not in (0, 1):
        raise ValueError(f"correct must be 0 or 1, got {text!r}")
    return value


def _parse_radius(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"radius must be a finite number >= 0, got {text!r}")
    return value


_PARSERS: dict[str, Callable[[str], Any]] = {
    "idx": _parse_int, "label": _parse_int, "predict": _parse_int,
    "radius": _parse_radius, "correct": _parse_correct, "time": parse_seconds,
    "samples": _parse_int,
}


def _parse_row(line: str, columns: Sequence[str], line_number: int, path: Path) -> list[Any]:
    fields = line.rstrip("\r\n").split("\t")
    if fields and fields[-1] == "" and len(fields) == len(columns) + 1:
        fields = fields[:-1]  # a trailing tab
    if len(fields) != len(columns):
        raise fail(f"{path}, line {line_number}: expected {len(columns)} tab-separated fields "
                   f"({', '.join(columns)}), got {len(fields)}: {line.rstrip()!r}",
                   "Fix or delete that line (a run interrupted mid-row can be resumed with "
                   "TsvWriter(..., resume=True), which repairs a cut last line).")
    values = []
    for column, field in zip(columns, fields):
        try:
            values.append(_PARSERS.get(column, str)(field.strip()))
        except ValueError:
            raise fail(f"{path}, line {line_number}: bad {column} value {field!r} in "
                       f"{line.rstrip()!r}",
                       "Expected integers for idx/label/predict, correct 0 or 1, a radius >= 0 "
                       "and a time like 0:00:04.246721 or plain seconds.") from None
    return values


def _check_header(line: str, columns: Sequence[str], path: Path) -> None:
    found = tuple(field.strip() for field in line.rstrip("\r\n").split("\t"))
    if found == tuple(columns):
        return
    hint = ""
    if found == PREDICT_COLUMNS and tuple(columns) == CERTIFY_COLUMNS:
        hint = " This is a PREDICT output (no radius column); analysis needs a CERTIFY output."
    elif found == CERTIFY_COLUMNS and tuple(columns) == PREDICT_COLUMNS:
        hint = " This is a CERTIFY output, not a PREDICT output."
    raise fail(f"{path}, line 1: wrong header {line.rstrip()!r}; expected "
               f"{chr(9).join(columns)!r}.{hint}",
               "Point at a certification TSV written by `smoothmix certify` or by the reference "
               "certify.py (tab-separated, header first).")


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def load_certification(path: str | Path, *, allow_empty: bool = False) -> CertificationResult:
    """Read a CERTIFY TSV (ours or the reference tools'); rows may cover any subset of a test set.
    A sequential run's extra ``samples`` column (SEQUENTIAL_COLUMNS) is accepted and not used.

    Raises SmoothMixError naming the line on a missing file, a wrong header, a malformed row, an
    inconsistent ``correct`` column or a repeated idx; and on a file without rows unless
    ``allow_empty``.
    """
    path = Path(path)
    if not path.is_file():
        raise fail(f"certification file {path} does not exist",
                   "Pass the TSV written by `smoothmix certify --out FILE` (or a reference file).")
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    if not lines:
        raise fail(f"{path} is empty (no header)",
                   f"Expected the header {chr(9).join(CERTIFY_COLUMNS)!r} and one row per input.")
    found = tuple(field.strip() for field in lines[0].rstrip("\r\n").split("\t"))
    columns = SEQUENTIAL_COLUMNS if found == SEQUENTIAL_COLUMNS else CERTIFY_COLUMNS
    _check_header(lines[0], columns, path)
    rows: list[list[Any]] = []
    first_line_of: dict[int, int] = {}
    for line_number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        row = _parse_row(line, columns, line_number, path)[:len(CERTIFY_COLUMNS)]
        idx, label, predict, _, correct, _ = row
        if correct != int(predict == label):
            raise fail(f"{path}, line {line_number}: correct = {correct} but predict = {predict} "
                       f"and label = {label}", "The file is corrupt; re-run certification.")
        if idx in first_line_of:
            raise fail(f"{path}, line {line_number}: idx {idx} already appeared on line "
                       f"{first_line_of[idx]}",
                       "Remove the duplicated rows (each input must be counted once).")
        first_line_of[idx] = line_number
        rows.append(row)
    if not rows and not allow_empty:
        raise fail(f"{path} has a header but no rows",
                   "Certify at least one input before analysing (or wait for the run).")
    columns = list(zip(*rows)) if rows else [()] * len(CERTIFY_COLUMNS)
    return CertificationResult(*(np.asarray(column) for column in columns), source=str(path))


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def write_certification(result: CertificationResult, path: str | Path,
                        radius_format: str = RADIUS_FORMAT) -> Path:
    """Write a whole result as a reference-format CERTIFY TSV, atomically."""
    lines = ["\t".join(CERTIFY_COLUMNS) + "\n"]
    for row in zip(result.idx, result.label, result.predict, result.radius, result.correct,
                   result.time):
        lines.append(format_row(CERTIFY_COLUMNS, row, radius_format))
    return atomic_write_text(path, "".join(lines))


def _repair_and_read_done(path: Path, columns: Sequence[str]) -> set[int]:
    """Cut a partial last line (no newline) off ``path``; return the idx of its complete rows."""
    with open(path, "rb") as handle:
        data = handle.read()
    keep = data.rfind(b"\n") + 1  # 0 when there is no complete line at all
    if keep != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
    lines = data[:keep].decode("utf-8").splitlines(keepends=True)
    if not lines:
        return set()
    _check_header(lines[0], columns, path)
    done: dict[int, int] = {}
    index_column = list(columns).index("idx")
    for line_number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        idx = _parse_row(line, columns, line_number, path)[index_column]
        if idx in done:
            raise fail(f"{path}, line {line_number}: idx {idx} already appeared on line "
                       f"{done[idx]}", "Remove the duplicated rows before resuming.")
        done[idx] = line_number
    return set(done)


class TsvWriter:
    """Row-by-row writer of the reference TSV (CERTIFY or PREDICT columns).

    Every :meth:`write_row` is written and flushed at once, so an interrupted run loses nothing.
    ``resume=True`` keeps an existing file: a partial last line (a row cut by the interruption) is
    removed, ``done`` holds the idx already written, and new rows are appended without a second
    header. ``resume=False`` starts a new file (an existing one is replaced, as in the reference
    certify.py). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path, columns: Sequence[str] = CERTIFY_COLUMNS, *,
                 resume: bool = False, radius_format: str = RADIUS_FORMAT,
                 fsync: bool = False) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        if "idx" not in self.columns:
            raise fail(f"columns {list(columns)} have no 'idx' column",
                       f"Use {CERTIFY_COLUMNS} or {PREDICT_COLUMNS}.")
        self.radius_format = radius_format
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.is_file():
            self.done: set[int] = _repair_and_read_done(self.path, self.columns)
            needs_header = self.path.stat().st_size == 0
            self._handle = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        else:
            self.done = set()
            needs_header = True
            self._handle = open(self.path, "w", encoding="utf-8", newline="")  # noqa: SIM115
        if needs_header:
            self._write("\t".join(self.columns) + "\n")

    def _write(self, line: str) -> None:
        self._handle.write(line)
        self._handle.flush()
        if self.fsync:
            os.fsync(self._handle.fileno())

    def write_row(self, *values: Any) -> None:
        """Append one row (values in column order) and flush it to the file."""
        if self._handle.closed:
            raise fail(f"TsvWriter for {self.path} is closed", "Open a new TsvWriter to write.")
        line = format_row(self.columns, values, self.radius_format)
        idx = int(values[self.columns.index("idx")])
        if idx in self.done:
            raise fail(f"idx {idx} is already in {self.path}",
                       "Skip inputs listed in TsvWriter.done (each input is written once).")
        self._write(line)
        self.done.add(idx)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def __enter__(self) -> TsvWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# table and plot
# ------------------------------------------------------------------------------------------------
def _check_results(results: Mapping[str, CertificationResult], what: str) -> None:
    if not isinstance(results, Mapping) or not results:
        raise fail(f"{what} must be a non-empty dict name -> CertificationResult, got {results!r}",
                   "Pass e.g. {'SmoothMix': load_certification('certify.tsv')}.")
    for result in results.values():
        _require_rows(result)


def _check_radii(radii: Iterable[float]) -> list[float]:
    values = [float(r) for r in np.atleast_1d(np.asarray(radii, dtype=np.float64))]
    if not values or not all(math.isfinite(r) and r >= 0 for r in values):
        raise fail(f"radii must be a non-empty list of finite numbers >= 0, got {radii!r}",
                   "Pass e.g. radii=[0, 0.25, 0.5, 0.75].")
    return values


def markdown_table(results: Mapping[str, CertificationResult],
                   radii: Iterable[float] = DEFAULT_RADII, *, show_count: bool = False) -> str:
    """The paper's Table 2 layout: one row per model, ACR (3 decimals) then the approximate
    certified accuracy (%, 1 decimal) at each radius. ``show_count`` adds the number of inputs."""
    _check_results(results, "results")
    radii = _check_radii(radii)
    header = ["Model", "ACR", *(f"{r:.2f}" for r in radii)] + (["inputs"] if show_count else [])
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, result in results.items():
        accuracy = certified_accuracy(result, radii)
        cells = [str(name).replace("|", "\\|"), f"{average_certified_radius(result):.3f}",
                 *(f"{100 * a:.1f}" for a in accuracy)]
        if show_count:
            cells.append(str(len(result)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_certified_accuracy(results: Mapping[str, CertificationResult], path: str | Path,
                            reference: Mapping[str, CertificationResult] | None = None,
                            title: str | None = None, max_radius: float | None = None) -> Path:
    """PNG of approximate certified accuracy vs ℓ2 radius (the paper's Figure 4): one step curve
    per model over a fine radius grid; ``reference`` curves are dashed. Written atomically; headless
    (renders with the Agg canvas, never touching pyplot's global backend). Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_results(results, "results")
    reference = dict(reference or {})
    if reference:
        _check_results(reference, "reference")
    curves = [(name, result, False) for name, result in results.items()]
    curves += [(name, result, True) for name, result in reference.items()]
    if max_radius is None:
        largest = max(float(np.max(r.radius[r.certified], initial=0.0)) for _, r, _ in curves)
        max_radius = 1.05 * largest if largest > 0 else 1.0
    max_radius = float(check_positive("max_radius", max_radius))
    grid = np.linspace(0.0, max_radius, 2001)

    figure = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for number, (name, result, dashed) in enumerate(curves):
        label = f"{name} (ACR {average_certified_radius(result):.3f})"
        axes.plot(grid, certified_accuracy(result, grid), drawstyle="steps-post",
                  linestyle="--" if dashed else "-", linewidth=1.6, color=f"C{number % 10}",
                  label=label)
    axes.set_xlabel("radius (ℓ2)")
    axes.set_ylabel("certified accuracy")
    axes.set_xlim(0.0, max_radius)
    axes.set_ylim(0.0, 1.02)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper right", fontsize="small")
    if title:
        axes.set_title(title)
    figure.tight_layout()

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())

