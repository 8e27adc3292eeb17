"""The CDB files of the Hoda handwriting collections: digits (2005) and letters (CDB 5.0, 2010).

Both are little-endian: a header, then one record per image, each a short head followed by the image data.
The two versions agree on the image data and disagree on the header and on the field widths of the record
head:

=================  ==========================================  ============================================
                   digits (``Test 20000.cdb``, ...)            letters, ``CDB 5.0`` (``Persian-Character-..``)
=================  ==========================================  ============================================
header             1024 bytes: year (uint16), month, day,      magic ``CDB 5.0`` (7 bytes), year (uint16),
                   H, W (uint8), record count (uint32),        month, day, W, H (uint16), record count
                   128 label counts (uint32), image type,      (uint32), N label slots (uint16), N label
                   comment (256), reserved                     counts (uint32), image type, comment (512),
                                                               reserved (490): 1024 + 4 N bytes
record head        marker 0xFF, label, [width, height]         marker 0xFFFF, label, confidence,
                   (uint8 each), byte count (uint16)           [width, height] (uint16 each), byte count
                                                               (uint32)
=================  ==========================================  ============================================

Width and height are present only when the header's W or H is 0 (sizes vary: the case of every file
published). The byte count is the number of image-data bytes that follow. (The letters' byte count is
sometimes read as a uint16 followed by two zero bytes; on the published file both readings decode the same
pixels, but only the uint32 one makes the count equal the data that follows.)

Image data, image type 0 (binary): run lengths (uint8) row by row, alternating background, ink, background,
... from the start of each row (a leading 0 when a row starts with ink) until the runs sum to the width.
Image type 1 (grey): width * height bytes, column-major.

Decoding is vectorised over all records at once (only the record heads are walked in Python). Errors are
one line naming the file and the record: bad magic or marker, truncation, runs overflowing the width, byte
counts that disagree with the run-length data, record or label counts that disagree with the header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.data.errors import CorruptDataError
from diffusion_lab.data.transforms import single_thread
from diffusion_lab.utils.media import to_uint8

__all__ = [
    "CdbHeader",
    "CdbRecords",
    "RecordLayout",
    "DIGITS_FORMAT",
    "CDB5_FORMAT",
    "read_cdb",
    "read_cdb_header",
    "fit_in_box",
    "cdb_error",
]

DIGITS_FORMAT = "digits"  # the 2005 digits' format: fixed 1024-byte header, uint8 record fields
CDB5_FORMAT = "CDB 5.0"  # the letters' format, named by its magic text
CDB5_MAGIC = CDB5_FORMAT.encode("ascii")
HEADER_SIZE = 1024  # the digits' header; CDB 5.0 adds 4 bytes per label slot
_CDB5_PREFIX = struct.Struct("<7sHBBHHIH")  # magic, year, month, day, W, H, record count, label slots
_CDB5_COMMENT, _CDB5_RESERVED = 512, 490


@dataclass(frozen=True)
class RecordLayout:
    """The fields of a record head: (marker, label, [confidence], [width, height], byte count).

    ``fixed`` is the head when the header fixes the image size, ``variable`` the head with width and height.
    """

    marker: int
    fixed: struct.Struct
    variable: struct.Struct

    def marker_text(self, value: int) -> str:
        """``value`` in hex, as many digits as the marker (0xfe, 0xfffe)."""
        return f"0x{value:0{len(f'{self.marker:x}')}x}"


LAYOUTS = {
    DIGITS_FORMAT: RecordLayout(0xFF, struct.Struct("<BBH"), struct.Struct("<BBBBH")),
    CDB5_FORMAT: RecordLayout(0xFFFF, struct.Struct("<HHHI"), struct.Struct("<HHHHHI")),
}


@dataclass(frozen=True)
class CdbHeader:
    year: int
    month: int
    day: int
    height: int  # fixed height, 0 when sizes vary
    width: int  # fixed width, 0 when sizes vary
    total: int  # number of records
    label_counts: tuple[int, ...]  # per-label counts (128 slots for digits, N for CDB 5.0)
    image_type: int  # 0 binary (run-length), 1 grey
    comment: str
    format: str = DIGITS_FORMAT  # DIGITS_FORMAT or CDB5_FORMAT
    size: int = HEADER_SIZE  # header bytes; the first record starts here


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


def cdb_error(path: Path, msg: str) -> CorruptDataError:
    """The one-line error for a malformed CDB file: the file, the problem (with the record), the fix."""
    return CorruptDataError(f"CDB file {path}: {msg}; re-download it")


def _check_image_type(image_type: int, path: Path) -> None:
    if image_type not in (0, 1):
        raise cdb_error(path, f"unknown image type {image_type} in the header (0 binary, 1 grey)")


def _read_digits_header(buf: bytes, path: Path) -> CdbHeader:
    if len(buf) < HEADER_SIZE:
        raise cdb_error(path, f"truncated header ({len(buf)} of {HEADER_SIZE} bytes)")
    year, month, day, height, width, total = struct.unpack_from("<HBBBBI", buf, 0)
    counts = struct.unpack_from("<128I", buf, 10)
    image_type = buf[522]
    _check_image_type(image_type, path)
    comment = buf[523:779].split(b"\0", 1)[0].decode("latin-1")
    return CdbHeader(year, month, day, height, width, total, counts, image_type, comment)


def _read_cdb5_header(buf: bytes, path: Path) -> CdbHeader:
    if len(buf) < _CDB5_PREFIX.size:
        raise cdb_error(path, f"truncated header ({len(buf)} bytes, the CDB 5.0 header starts with 21)")
    _, year, month, day, width, height, total, slots = _CDB5_PREFIX.unpack_from(buf, 0)
    at = _CDB5_PREFIX.size + 4 * slots  # the image type follows the label counts
    size = at + 1 + _CDB5_COMMENT + _CDB5_RESERVED
    if len(buf) < size:
        raise cdb_error(path, f"truncated header ({len(buf)} of {size} bytes for {slots} label slots)")
    counts = struct.unpack_from(f"<{slots}I", buf, _CDB5_PREFIX.size)
    image_type = buf[at]
    _check_image_type(image_type, path)
    comment = buf[at + 1 : at + 1 + _CDB5_COMMENT].split(b"\0", 1)[0].decode("latin-1")
    return CdbHeader(year, month, day, height, width, total, counts, image_type, comment, CDB5_FORMAT, size)


def read_cdb_header(buf: bytes, path: Path, fmt: str | None = None) -> CdbHeader:
    """The header of a CDB file's bytes; ``fmt`` (``DIGITS_FORMAT``/``CDB5_FORMAT``) or None to detect it.

    A file starting with the magic ``CDB 5.0`` is a letters file, any other a digits file.
    """
    found = CDB5_FORMAT if buf.startswith(CDB5_MAGIC) else DIGITS_FORMAT
    if fmt is not None and fmt not in LAYOUTS:
        raise ValueError(f"unknown CDB format '{fmt}'; choose one of {sorted(LAYOUTS)}")
    if fmt == CDB5_FORMAT and found != fmt:
        raise CorruptDataError(
            f"CDB file {path}: bad header, starts with {buf[:7]!r} instead of the magic 'CDB 5.0' of the "
            "letters' format; re-download it (a Hoda digits file reads with dataset=persian)"
        )
    if fmt == DIGITS_FORMAT and found != fmt:
        raise CorruptDataError(
            f"CDB file {path}: a CDB 5.0 file (Hoda letters), not the digits' format; read it with "
            "dataset=persian_letters"
        )
    return _read_cdb5_header(buf, path) if found == CDB5_FORMAT else _read_digits_header(buf, path)


def _walk_records(buf: bytes, header: CdbHeader, path: Path) -> tuple[np.ndarray, ...]:
    """Locate every record: (labels, widths, heights, data offsets, byte counts), each (N,) int64."""
    layout = LAYOUTS[header.format]
    size = len(buf)
    fixed = header.width > 0 and header.height > 0
    head = layout.fixed if fixed else layout.variable
    labels, widths, heights, starts, counts = [], [], [], [], []
    pos = header.size
    for i in range(header.total):
        if pos + head.size > size:
            raise cdb_error(
                path, f"truncated at record {i} (file ends at byte {size}, header counts {header.total})"
            )
        fields = head.unpack_from(buf, pos)
        if fields[0] != layout.marker:
            raise cdb_error(
                path,
                f"record {i} at byte {pos} has marker {layout.marker_text(fields[0])}, "
                f"expected {layout.marker_text(layout.marker)}",
            )
        labels.append(fields[1])
        if fixed:
            widths.append(header.width)
            heights.append(header.height)
        else:
            widths.append(fields[-3])
            heights.append(fields[-2])
        nbytes = fields[-1]
        starts.append(pos + head.size)
        counts.append(nbytes)
        pos += head.size + nbytes
        if pos > size:
            raise cdb_error(
                path, f"truncated in record {i} (needs {nbytes} data bytes, file ends at byte {size})"
            )
    if pos != size:
        raise cdb_error(
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
    runs = raw[np.repeat(starts, nbytes) + j_in_rec].astype(np.int64)
    cum = np.cumsum(runs, dtype=np.int64)
    before = np.concatenate(([0], cum))[first]  # pixels of all earlier records
    end = cum - np.repeat(before, nbytes)  # in-record end of each run
    start = end - runs
    w = np.repeat(np.maximum(widths, 1), nbytes)
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
            raise cdb_error(path, f"record {i} has an empty size {wi}x{hi}")
        if rec_overflow[i]:
            j = int(np.flatnonzero(overflow[first[i] : first[i] + nbytes[i]])[0] + first[i])
            raise cdb_error(path, f"record {i}: runs overflow the width {wi} in row {int(start[j]) // wi}")
        covered = int(end[last[i]]) if nbytes[i] else 0
        raise cdb_error(
            path,
            f"record {i}: byte count {int(nbytes[i])} does not match its run-length data "
            f"({covered} pixels coded for {wi}x{hi} = {wi * hi})",
        )

    # colour: the k-th run of a row (k from 0) is ink when k is odd; the runs tile every record exactly
    row_start = np.ones(m, dtype=bool)
    row_start[1:] = row_end[:-1] | (j_in_rec[1:] == 0)
    idx = np.arange(m, dtype=np.int64)
    k = idx - np.maximum.accumulate(np.where(row_start, idx, 0))
    colour = (k & 1).astype(np.uint8) * np.uint8(255)
    pixels = np.repeat(colour, runs)
    offsets = _exclusive_cumsum(widths * heights)
    return pixels, offsets


def _shape_keys(heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """One int64 per distinct (H, W) (both below 2^16 in either format)."""
    return heights * 65536 + widths


def _decode_grey(
    buf: bytes, widths: np.ndarray, heights: np.ndarray, starts: np.ndarray, nbytes: np.ndarray, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Grey records (width * height bytes, column-major) to row-major pixels and offsets."""
    size = widths * heights
    bad = np.flatnonzero((nbytes != size) | (size <= 0))
    if bad.size:
        i = int(bad[0])
        raise cdb_error(
            path, f"record {i}: byte count {int(nbytes[i])} does not match its size {widths[i]}x{heights[i]}"
        )
    raw = np.frombuffer(buf, dtype=np.uint8)
    offsets = _exclusive_cumsum(size)
    pixels = np.empty(int(size.sum()), dtype=np.uint8)
    keys = _shape_keys(heights, widths)
    for key in np.unique(keys):
        ids = np.flatnonzero(keys == key)
        h, w = int(key // 65536), int(key % 65536)
        block = raw[starts[ids, None] + np.arange(h * w)].reshape(-1, w, h).transpose(0, 2, 1)
        pixels[offsets[ids, None] + np.arange(h * w)] = block.reshape(len(ids), h * w)
    return pixels, offsets


def read_cdb(path: Path | str, expected_records: int | None = None, fmt: str | None = None) -> CdbRecords:
    """Decode every record of a Hoda ``.cdb`` file (digits or CDB 5.0 letters).

    Args:
        path: the file.
        expected_records: when given, the record count the file must hold.
        fmt: ``DIGITS_FORMAT`` or ``CDB5_FORMAT`` to insist on one format; None detects it by the magic.

    Raises:
        CorruptDataError: bad magic or marker, truncation, runs overflowing the width, byte-count mismatch, a
            label outside the header's label slots, record or label counts disagreeing with the header or
            ``expected_records``; names the file and record.
    """
    path = Path(path)
    buf = path.read_bytes()
    header = read_cdb_header(buf, path, fmt)
    if expected_records is not None and header.total != expected_records:
        raise cdb_error(
            path, f"record count mismatch: header announces {header.total}, expected {expected_records}"
        )
    labels, widths, heights, starts, nbytes = _walk_records(buf, header, path)
    decode = _decode_runs if header.image_type == 0 else _decode_grey
    pixels, offsets = decode(buf, widths, heights, starts, nbytes, path)
    slots = len(header.label_counts)
    outside = np.flatnonzero(labels >= slots)
    if outside.size:
        i = int(outside[0])
        raise cdb_error(path, f"record {i} has label {labels[i]}, outside the header's {slots} label slots")
    counts = np.bincount(labels, minlength=slots)
    if sum(header.label_counts) == header.total and not np.array_equal(counts, header.label_counts):
        k = int(np.flatnonzero(counts != np.asarray(header.label_counts))[0])
        raise cdb_error(
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
    out = torch.zeros(len(records), 1, size, size, dtype=torch.uint8)
    key = _shape_keys(records.heights, records.widths)
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
        x = to_uint8(x, value_range=(0, 255))
    top, left = (size - nh) // 2, (size - nw) // 2
    out[torch.from_numpy(ids), :, top : top + nh, left : left + nw] = x
