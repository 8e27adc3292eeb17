"""Hoda handwritten Persian (Farsi) digits (Khosravi & Kabir 2007), 102,352 binary scans, labels 0-9.

The three original ``.cdb`` files (public repository amir-saniyan/HodaDatasetReader, folder ``DigitDB/``):

    Train 60000.cdb        60,000 records, 6,000 per class
    Test 20000.cdb         20,000 records, 2,000 per class
    RemainingSamples.cdb   22,352 records, 1,923 to 2,371 per class

CDB layout (little-endian): a 1024-byte header

    offset 0 year (uint16), 2 month, 3 day, 4 H, 5 W (0 = sizes vary), 6 record count (uint32),
    10 per-label counts (128 x uint32), 522 image type (0 binary run-length, 1 grey), 523 comment (256 bytes)

then one record per image: marker 0xFF, label, [width, height when W or H is 0], byte count (uint16), data.
Binary data is run-length coded row by row: uint8 run lengths alternating background, ink, background, ...
(each row starts with background, a leading 0 when it starts with ink) until the runs sum to the width.
Grey data is width * height bytes, column-major.

Decoding is vectorised over all records at once (only the record headers are walked in Python), so the
42,352 records available offline decode in well under a second. Each image is then scaled to fit a
``box_fraction * image_size`` box keeping its aspect ratio (like MNIST's 20-in-28 digits) and centred on a
dark canvas, ink bright (255) as in MNIST.

``split: auto`` trains on ``Train 60000.cdb`` when present, else on ``RemainingSamples.cdb`` when present,
else downloads ``Train 60000.cdb`` (when enabled). Evaluation always uses ``Test 20000.cdb``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.data.download import download_file, join_url
from diffusion_lab.data.errors import CorruptDataError
from diffusion_lab.data.source import DataSource, Decoded
from diffusion_lab.data.transforms import single_thread, to_channels, to_uint8

__all__ = [
    "CdbHeader",
    "CdbRecords",
    "read_cdb",
    "read_cdb_header",
    "fit_in_box",
    "PersianSource",
    "HODA_FILES",
]

HEADER_SIZE = 1024
RECORD_MARKER = 0xFF
HODA_BASE_URL = "https://raw.githubusercontent.com/amir-saniyan/HodaDatasetReader/master/DigitDB/"
# part -> (file name, md5 or None when not published, record count, per-class count or None)
HODA_FILES = {
    "train": ("Train 60000.cdb", None, 60000, 6000),
    "test": ("Test 20000.cdb", "81b038f2151182e42ab728f2c232afde", 20000, 2000),
    "remaining": ("RemainingSamples.cdb", "20c50a7fec6cc9002f2a87166923a5a8", 22352, None),
}
NUM_DIGITS = 10


@dataclass(frozen=True)
class CdbHeader:
    year: int
    month: int
    day: int
    height: int  # fixed height, 0 when sizes vary
    width: int  # fixed width, 0 when sizes vary
    total: int  # number of records
    label_counts: tuple[int, ...]  # 128 per-label counts
    image_type: int  # 0 binary (run-length), 1 grey
    comment: str


@dataclass
class CdbRecords:
    """All records of one CDB file, decoded to pixels.

    ``pixels`` holds every image back to back, row-major, 0 = background and 255 = ink for binary files;
    record ``i`` is ``pixels[o : o + h * w].reshape(h, w)`` with ``o, h, w = offsets[i], heights[i],
    widths[i]`` (see :meth:`image`).
    """

    path: Path
    header: CdbHeader
    labels: np.ndarray  # (N,) int64
    heights: np.ndarray  # (N,) int64
    widths: np.ndarray  # (N,) int64
    offsets: np.ndarray  # (N,) int64
    pixels: np.ndarray  # (sum h*w,) uint8

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """Record ``i`` as an (H, W) uint8 array."""
        h, w, o = int(self.heights[i]), int(self.widths[i]), int(self.offsets[i])
        return self.pixels[o : o + h * w].reshape(h, w)


def _corrupt(path: Path, msg: str) -> CorruptDataError:
    return CorruptDataError(f"CDB file {path}: {msg}; re-download it")


def read_cdb_header(buf: bytes, path: Path) -> CdbHeader:
    if len(buf) < HEADER_SIZE:
        raise _corrupt(path, f"truncated header ({len(buf)} of {HEADER_SIZE} bytes)")
    year, month, day, height, width, total = struct.unpack_from("<HBBBBI", buf, 0)
    counts = struct.unpack_from("<128I", buf, 10)
    image_type = buf[522]
    if image_type not in (0, 1):
        raise _corrupt(path, f"unknown image type {image_type} in the header (0 binary, 1 grey)")
    comment = buf[523:779].split(b"\0", 1)[0].decode("latin-1")
    return CdbHeader(year, month, day, height, width, total, counts, image_type, comment)


def _walk_records(buf: bytes, header: CdbHeader, path: Path) -> tuple[np.ndarray, ...]:
    """Locate every record: (labels, widths, heights, data offsets, byte counts), each (N,) int64."""
    size = len(buf)
    fixed = header.width > 0 and header.height > 0
    head = 4 if fixed else 6  # marker, label, [w, h], byte count
    labels, widths, heights, starts, counts = [], [], [], [], []
    pos = HEADER_SIZE
    for i in range(header.total):
        if pos + head > size:
            raise _corrupt(
                path, f"truncated at record {i} (file ends at byte {size}, header counts {header.total})"
            )
        if buf[pos] != RECORD_MARKER:
            raise _corrupt(path, f"record {i} at byte {pos} has marker 0x{buf[pos]:02x}, expected 0xff")
        labels.append(buf[pos + 1])
        if fixed:
            widths.append(header.width)
            heights.append(header.height)
        else:
            widths.append(buf[pos + 2])
            heights.append(buf[pos + 3])
        nbytes = buf[pos + head - 2] | (buf[pos + head - 1] << 8)
        starts.append(pos + head)
        counts.append(nbytes)
        pos += head + nbytes
        if pos > size:
            raise _corrupt(
                path, f"truncated in record {i} (needs {nbytes} data bytes, file ends at byte {size})"
            )
    if pos != size:
        raise _corrupt(
            path,
            f"record count mismatch: {size - pos} bytes follow the {header.total} records of the header",
        )
    return tuple(np.asarray(a, dtype=np.int64) for a in (labels, widths, heights, starts, counts))


def _exclusive_cumsum(a: np.ndarray) -> np.ndarray:
    out = np.zeros(len(a), dtype=np.int64)
    np.cumsum(a[:-1], out=out[1:])
    return out


def _decode_runs(
    buf: bytes, widths: np.ndarray, heights: np.ndarray, starts: np.ndarray, nbytes: np.ndarray, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised run-length decoding of every binary record: (pixels uint8, per-record pixel offsets).

    With run j of record r at in-record pixel positions [s_j, e_j): a run with e_j a multiple of the width W_r
    (and length > 0) ends a row, the next run starts a row, and runs alternate background / ink from each row
    start. A run is corrupt when it crosses a row end; a record is corrupt when its rows do not add up to
    exactly H_r rows ending on its last byte (the byte count).
    """
    n = len(widths)
    raw = np.frombuffer(buf, dtype=np.uint8)
    m = int(nbytes.sum())
    rec = np.repeat(np.arange(n, dtype=np.int32), nbytes)  # record of each run
    first = _exclusive_cumsum(nbytes)  # index of each record's first run
    j_in_rec = np.arange(m, dtype=np.int64) - np.repeat(first, nbytes)
    runs = raw[np.repeat(starts, nbytes) + j_in_rec].astype(np.int32)
    cum = np.cumsum(runs, dtype=np.int64)
    before = np.concatenate(([0], cum))[first]  # pixels of all earlier records
    end = (cum - np.repeat(before, nbytes)).astype(np.int32)  # in-record end of each run
    start = end - runs
    w = np.repeat(np.maximum(widths, 1).astype(np.int32), nbytes)
    next_row = (start // w + 1) * w  # the first row boundary after the run's start
    row_end = (runs > 0) & (end == next_row)
    overflow = end > next_row
    bad_size = (widths <= 0) | (heights <= 0)

    # per-record checks: no run crosses a row end; exactly H rows; the last run ends the last row
    rows = np.bincount(rec, weights=row_end, minlength=n).astype(np.int64)
    last = first + nbytes - 1
    has_runs = nbytes > 0
    last_ends_row = np.zeros(n, dtype=bool)
    last_ends_row[has_runs] = row_end[last[has_runs]]
    rec_overflow = np.bincount(rec, weights=overflow, minlength=n) > 0
    bad = bad_size | rec_overflow | (rows != heights) | ~last_ends_row
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        wi, hi = int(widths[i]), int(heights[i])
        if bad_size[i]:
            raise _corrupt(path, f"record {i} has an empty size {wi}x{hi}")
        if rec_overflow[i]:
            j = int(np.flatnonzero(overflow[first[i] : first[i] + nbytes[i]])[0] + first[i])
            raise _corrupt(path, f"record {i}: runs overflow the width {wi} in row {int(start[j]) // wi}")
        covered = int(end[last[i]]) if nbytes[i] else 0
        raise _corrupt(
            path,
            f"record {i}: byte count {int(nbytes[i])} does not match its run-length data "
            f"({covered} pixels coded for {wi}x{hi} = {wi * hi})",
        )

    # colour: the k-th run of a row (k from 0) is ink when k is odd; the runs tile every record exactly
    row_start = np.ones(m, dtype=bool)
    row_start[1:] = row_end[:-1] | (j_in_rec[1:] == 0)
    idx = np.arange(m, dtype=np.int32)
    k = idx - np.maximum.accumulate(np.where(row_start, idx, 0))
    colour = (k & 1).astype(np.uint8) * np.uint8(255)
    pixels = np.repeat(colour, runs)
    offsets = _exclusive_cumsum(widths * heights)
    return pixels, offsets


def _decode_grey(
    buf: bytes, widths: np.ndarray, heights: np.ndarray, starts: np.ndarray, nbytes: np.ndarray, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Grey records (width * height bytes, column-major) to row-major pixels and offsets."""
    size = widths * heights
    bad = np.flatnonzero((nbytes != size) | (size <= 0))
    if bad.size:
        i = int(bad[0])
        raise _corrupt(
            path, f"record {i}: byte count {int(nbytes[i])} does not match its size {widths[i]}x{heights[i]}"
        )
    raw = np.frombuffer(buf, dtype=np.uint8)
    offsets = _exclusive_cumsum(size)
    pixels = np.empty(int(size.sum()), dtype=np.uint8)
    for key in np.unique(heights * 256 + widths):
        ids = np.flatnonzero(heights * 256 + widths == key)
        h, w = int(key // 256), int(key % 256)
        block = raw[starts[ids, None] + np.arange(h * w)].reshape(-1, w, h).transpose(0, 2, 1)
        pixels[offsets[ids, None] + np.arange(h * w)] = block.reshape(len(ids), h * w)
    return pixels, offsets


def read_cdb(path: Path | str, expected_records: int | None = None) -> CdbRecords:
    """Decode every record of a Hoda ``.cdb`` file.

    Args:
        path: the file.
        expected_records: when given, the record count the file must hold.

    Raises:
        CorruptDataError: bad marker, truncation, runs overflowing the width, byte-count mismatch, record or
            label counts disagreeing with the header or ``expected_records``; names the file and record.
    """
    path = Path(path)
    buf = path.read_bytes()
    header = read_cdb_header(buf, path)
    if expected_records is not None and header.total != expected_records:
        raise _corrupt(
            path, f"record count mismatch: header announces {header.total}, expected {expected_records}"
        )
    labels, widths, heights, starts, nbytes = _walk_records(buf, header, path)
    decode = _decode_runs if header.image_type == 0 else _decode_grey
    pixels, offsets = decode(buf, widths, heights, starts, nbytes, path)
    counts = np.bincount(labels, minlength=128)[:128]
    if sum(header.label_counts) == header.total and not np.array_equal(counts, header.label_counts):
        k = int(np.flatnonzero(counts != np.asarray(header.label_counts))[0])
        raise _corrupt(
            path,
            f"label counts disagree with the header (label {k}: {counts[k]} records, header says "
            f"{header.label_counts[k]})",
        )
    return CdbRecords(path, header, labels, heights, widths, offsets, pixels)


def fit_in_box(records: CdbRecords, size: int, box_fraction: float = 0.8) -> Tensor:
    """Scale every record to fit a ``round(box_fraction * size)`` square keeping its aspect ratio, centred.

    Bilinear with antialiasing; records of equal shape are resized together, so the cost is one interpolate
    call per distinct (H, W), not per image.

    Returns:
        uint8 (N, 1, size, size).
    """
    if not 0 < box_fraction <= 1:
        raise ValueError(f"box_fraction must lie in (0, 1], got {box_fraction}")
    box = max(1, round(box_fraction * size))
    h, w = records.heights, records.widths
    out = torch.zeros(len(records), 1, size, size, dtype=torch.uint8)
    key = h * 256 + w
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.diff(key[order])) + 1
    with single_thread():
        for ids in np.split(order, bounds):
            _fit_group(records, ids, size, box, out)
    return out


def _fit_group(records: CdbRecords, ids: np.ndarray, size: int, box: int, out: Tensor) -> None:
    """Resize the records ``ids`` (all of one shape) into ``out`` (N, 1, size, size), in place."""
    hi, wi = int(records.heights[ids[0]]), int(records.widths[ids[0]])
    scale = box / max(hi, wi)
    nh, nw = max(1, round(hi * scale)), max(1, round(wi * scale))
    block = records.pixels[records.offsets[ids, None] + np.arange(hi * wi)]  # (G, hi * wi)
    x = torch.from_numpy(block).view(len(ids), 1, hi, wi)
    if (nh, nw) != (hi, wi):
        x = F.interpolate(x.float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        x = to_uint8(x)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[torch.from_numpy(ids), :, top : top + nh, left : left + nw] = x


class PersianSource(DataSource):
    """Hoda Persian digits from the original ``.cdb`` files in ``root`` (downloaded when enabled)."""

    name = "persian"
    splits = ("auto", "train", "remaining", "test")
    default_split = "auto"
    default_image_size = 32
    default_channels = 1
    downloadable = True
    fixed_num_classes = NUM_DIGITS

    def __init__(self, *args, mirrors: list[str] | None = None, box_fraction: float = 0.8, **kwargs):
        super().__init__(*args, **kwargs)
        if self.root is None:
            raise ValueError("dataset 'persian': dataset.root must name the folder of the .cdb files")
        if not 0 < box_fraction <= 1:
            raise ValueError(f"dataset 'persian': box_fraction must lie in (0, 1], got {box_fraction}")
        self.mirrors = list(mirrors or [HODA_BASE_URL])
        self.box_fraction = float(box_fraction)

    def options(self) -> dict:
        return {"box_fraction": self.box_fraction}

    def plan(self, split: str) -> tuple[str, str | None]:
        self.check_split(split)
        if split == "test":
            return "test", None
        if split == "auto":
            present = {part: (self.root / HODA_FILES[part][0]).is_file() for part in ("train", "remaining")}
            split = "remaining" if present["remaining"] and not present["train"] else "train"
        return split, "test"

    def files(self, part: str) -> list[Path]:
        return [self.root / HODA_FILES[part][0]]

    def missing_hint(self, parts: tuple[str, ...]) -> str:
        if "train" in parts:
            return "offline, RemainingSamples.cdb + Test 20000.cdb also work: dataset.split=auto or remaining"
        return ""

    def download_one(self, path: Path) -> None:
        part = next(p for p, spec in HODA_FILES.items() if spec[0] == path.name)
        _, md5, count, _ = HODA_FILES[part]
        urls = [join_url(m, path.name) for m in self.mirrors]
        download_file(
            urls, path, md5=md5, validate=lambda tmp: self._check_counts(read_cdb(tmp, count), part)
        )

    @staticmethod
    def _check_counts(records: CdbRecords, part: str) -> None:
        name, _, count, per_class = HODA_FILES[part]
        if len(records) != count:
            raise _corrupt(
                records.path, f"record count mismatch: {len(records)} records, expected {count} ({name})"
            )
        hist = np.bincount(records.labels, minlength=NUM_DIGITS)
        if len(hist) > NUM_DIGITS:
            i = int(np.flatnonzero(records.labels >= NUM_DIGITS)[0])
            raise _corrupt(records.path, f"record {i} has label {records.labels[i]}, outside 0-9")
        if per_class is not None and not (hist == per_class).all():
            raise _corrupt(
                records.path, f"per-class counts {hist.tolist()}, expected {per_class} each ({name})"
            )

    def decode(self, part: str) -> Decoded:
        path = self.files(part)[0]
        records = read_cdb(path, HODA_FILES[part][2])
        self._check_counts(records, part)
        x = to_channels(fit_in_box(records, self.image_size, self.box_fraction), self.channels)
        return x, torch.from_numpy(records.labels), {"file": path.name, "comment": records.header.comment}
