"""Pick-a-Pic preference pairs, streamed from parquet (never the whole file in memory).

Schema (Pick-a-Pic v1/v2, the columns we read): `caption` (str), `jpg_0`, `jpg_1` (encoded image
bytes: JPEG or PNG), `label_0`, `label_1` (floats: 1/0, 0/1, or 0.5/0.5 for a tie). Other columns
are ignored. Rows are read in record batches; a bad row (an undecodable image, a missing or empty
caption, labels that are not a preference) is skipped and counted in `stats`, never fatal. A
file that is not parquet, or lacks a required column, is an error naming the file.

Order is the file's order, optionally shuffled inside a seeded buffer per epoch; `start` skips
that many *good* pairs (decoding them, so a bad row is never miscounted), which is what resuming
mid-epoch needs.

A validation split can be carved from a training file by caption (`split="train"` / `"val"` with
`val_fraction`): a caption belongs to the validation split when a stable hash of it falls below the
fraction, so the split is the same in every run and on every machine, and no prompt is in both.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

logger = logging.getLogger(__name__)

REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


@dataclass
class Pair:
    caption: str
    image0: np.ndarray  # uint8 [H, W, 3]
    image1: np.ndarray
    label0: float
    label1: float


def decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def open_parquet(path: str | Path):
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such preference data file")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise ValueError(f"{path}: not a readable parquet file ({exc})") from exc
    missing = [c for c in REQUIRED if c not in pf.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: missing Pick-a-Pic column(s) {missing}; found {pf.schema_arrow.names}")
    return pf


def captions(path: str | Path) -> set[str]:
    """The distinct captions of a Pick-a-Pic file, read column-wise (no images are decoded)."""
    out: set[str] = set()
    for batch in open_parquet(path).iter_batches(columns=["caption"]):
        out.update(c for c in batch.column(0).to_pylist() if c)
    return out


def in_validation(caption: str, val_fraction: float) -> bool:
    """Whether a caption belongs to the validation split: the first 8 bytes of its SHA-1, read as a
    fraction of 2⁶⁴, are below `val_fraction` (stable across runs, processes and machines)."""
    digest = hashlib.sha1(caption.encode("utf-8")).digest()[:8]
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


SPLITS = ("all", "train", "val")


class PickAPicStream:
    """Iterate decoded `Pair`s of a Pick-a-Pic parquet file.

    Args:
        path (`str | Path`): the parquet file.
        batch_rows (`int`, *optional*, defaults to 256): rows read per record batch.
        shuffle_buffer (`int`, *optional*, defaults to 0): seeded shuffle inside a buffer of this many
            rows (0: file order).
        seed (`int`, *optional*, defaults to 0): shuffle seed (combined with the epoch).
        drop_ties (`bool`, *optional*, defaults to False): skip 0.5/0.5 pairs (Diffusion-DPO does).
        split (`str`, *optional*, defaults to "all"): "train" yields only the pairs whose caption is not in
            the validation split, "val" only those whose caption is (see `in_validation`), "all" every pair.
        val_fraction (`float`, *optional*, defaults to 0.0): the share of captions in the validation split.
    """

    def __init__(self, path: str | Path, batch_rows: int = 256, shuffle_buffer: int = 0, seed: int = 0,
                 drop_ties: bool = False, split: str = "all", val_fraction: float = 0.0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
        if split == "val" and val_fraction == 0.0:
            raise ValueError("split='val' needs val_fraction > 0 (an empty validation split)")
        self.split = split
        self.val_fraction = val_fraction
        self.path = Path(path)
        self.file = open_parquet(self.path)
        self.batch_rows = batch_rows
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.drop_ties = drop_ties
        self.stats: Counter = Counter()

    def __len__(self) -> int:
        """Rows in the file (good and bad)."""
        return self.file.metadata.num_rows

    def _rows(self, epoch: int) -> Iterator[dict]:
        rng = np.random.default_rng([self.seed, epoch])
        buffer: list[dict] = []
        for batch in self.file.iter_batches(batch_size=self.batch_rows, columns=list(REQUIRED)):
            for row in batch.to_pylist():
                if self.shuffle_buffer <= 1:
                    yield row
                    continue
                buffer.append(row)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def _check(self, row: dict) -> str | None:
        caption = row.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            return "missing_caption"
        l0, l1 = row.get("label_0"), row.get("label_1")
        if l0 is None or l1 is None or not (0 <= l0 <= 1 and 0 <= l1 <= 1) or abs(l0 + l1 - 1) > 1e-6:
            return "bad_label"
        if self.drop_ties and l0 == l1:
            return "tie_dropped"
        if not row.get("jpg_0") or not row.get("jpg_1"):
            return "missing_image"
        return None

    def iter_epoch(self, epoch: int = 0, start: int = 0) -> Iterator[Pair]:
        """Good pairs of one epoch, skipping the first `start` good ones (resume)."""
        good = 0
        for row in self._rows(epoch):
            if self.split != "all" and isinstance(row.get("caption"), str):
                if in_validation(row["caption"], self.val_fraction) != (self.split == "val"):
                    continue  # the other split's pair: not bad, not counted
            problem = self._check(row)
            if problem:
                self.stats[problem] += 1
                continue
            try:
                pair = Pair(row["caption"], decode_image(row["jpg_0"]), decode_image(row["jpg_1"]),
                            float(row["label_0"]), float(row["label_1"]))
            except Exception as exc:  # PIL raises many types for bad bytes
                self.stats["undecodable_image"] += 1
                logger.debug("%s: skipping an undecodable image (%s)", self.path, exc)
                continue
            good += 1
            if good <= start:  # already consumed before a resume: decoded to count it exactly, not yielded
                continue
            self.stats["ok"] += 1
            yield pair

    def __iter__(self) -> Iterator[Pair]:
        return self.iter_epoch(0)


def write_pickapic(path: str | Path, rows: list[dict]) -> None:
    """Write rows (dicts with at least the Pick-a-Pic columns) to parquet, atomically.

    Image bytes repeat when the same image appears in several pairs; parquet's dictionary encoding
    stores each distinct image once, so the file stays small.
    """
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, use_dictionary=True, dictionary_pagesize_limit=256 * 1024 * 1024,
                   compression="zstd")
    os.replace(tmp, path)
