"""The FashionAI CSV format: `image_id,image_category` then 24 `x_y_v` cells in KEYPOINT_NAMES order.

v = 1 visible, 0 occluded (position annotated), -1 absent or not part of the category (`-1_-1_-1`).
The official test.csv has only the first two columns. Every parse error names the file, the row
(1-based, the header is row 1) and the image id; nothing is guessed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from typing import Iterator, Sequence

import numpy as np

from kpjax.data import keypoints as kp
from kpjax.errors import CsvFormatError
from kpjax.io import paths

HEADER: tuple[str, ...] = ('image_id', 'image_category') + kp.KEYPOINT_NAMES
ABSENT_CELL = '-1_-1_-1'
_COORDINATE = re.compile(r'[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?', re.ASCII)  # 266, 266.03, .5; no nan/inf
_VISIBILITY = re.compile(r'[+-]?\d+', re.ASCII)


@dataclasses.dataclass(frozen=True)
class Annotation:
  """One CSV row. keypoints: float32 (24, 2) pixels (x, y); visibility: int32 (24,) in {1, 0, -1}."""
  image_id: str
  category: str
  keypoints: np.ndarray
  visibility: np.ndarray
  row: int  # 1-based row number in the file (header = 1)
  ignored: tuple[str, ...] = ()  # a submission's cells of keypoints outside the category, read as absent


def parse_cell(cell: str, where: str = '') -> tuple[float, float, int]:
  """'x_y_v' -> (x, y, v); raises CsvFormatError for anything else.

  x and y are pixels, integers (the challenge's format) or decimals (`266.03_286.18_1`, as other tools
  write sub-pixel predictions); v is an integer: 1 visible, 0 occluded, -1 absent (`-1_-1_-1`).
  """
  parts = cell.strip().split('_')
  if (len(parts) != 3 or not all(_COORDINATE.fullmatch(p) for p in parts[:2])
      or not _VISIBILITY.fullmatch(parts[2])):
    raise CsvFormatError(f'{where}malformed keypoint cell {cell!r}; expected x_y_v with x, y numbers '
                         f'(integers or decimals) and v in {{1, 0, -1}}')
  x, y, v = float(parts[0]), float(parts[1]), int(parts[2])
  if not (math.isfinite(x) and math.isfinite(y)):  # 1e999 and the like overflow to inf
    raise CsvFormatError(f'{where}keypoint cell {cell!r} has a coordinate too large to be a pixel')
  if v not in (1, 0, -1):
    raise CsvFormatError(f'{where}keypoint cell {cell!r} has visibility {v}; expected 1, 0 or -1')
  if v == -1 and (x, y) != (-1, -1):
    raise CsvFormatError(f'{where}keypoint cell {cell!r} is absent (v=-1) but has a position; expected -1_-1_-1')
  if v >= 0 and (x < 0 or y < 0):
    raise CsvFormatError(f'{where}keypoint cell {cell!r} has a negative position for v={v}')
  return x + 0.0, y + 0.0, v  # + 0.0: no negative zeros


def format_cell(x: float, y: float, v: int, decimals: int = 0) -> str:
  """(x, y, v) -> 'x_y_v' with `decimals` digits after the point (0: whole pixels, the challenge's format)."""
  if v < 0:
    return ABSENT_CELL
  return f'{format_coordinate(x, decimals)}_{format_coordinate(y, decimals)}_{int(v)}'


def format_coordinate(value: float, decimals: int = 0) -> str:
  """A finite pixel coordinate rounded (half to even) to `decimals` >= 0 digits after the point; never '-0'."""
  if isinstance(decimals, bool) or int(decimals) != decimals or decimals < 0:
    raise ValueError(f'decimals must be a whole number >= 0; got {decimals!r}')
  if not math.isfinite(value):
    raise ValueError(f'cannot write the coordinate {value} to a FashionAI CSV')
  text = f'{value:.{int(decimals)}f}'
  return text[1:] if text.startswith('-') and float(text) == 0 else text


def _open_rows(path: str) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
  file = paths.resolve(path)
  if not file.is_file():
    raise CsvFormatError(f'{path}: no such file; expected a FashionAI CSV')
  try:
    rows = list(csv.reader(io.StringIO(file.read_bytes().decode('utf-8'), newline='')))
  except (UnicodeDecodeError, csv.Error) as e:
    raise CsvFormatError(f'{path}: not a readable CSV file ({e})') from None
  if not rows:
    raise CsvFormatError(f'{path}: empty file; expected a header `image_id,image_category,...`')
  header = [h.strip() for h in rows[0]]
  if header[:2] != list(HEADER[:2]):
    raise CsvFormatError(f'{path}: row 1: header starts with {header[:2]}; expected {list(HEADER[:2])}')
  return header, ((i + 2, r) for i, r in enumerate(rows[1:]) if any(c.strip() for c in r))


def parse_row(cells: Sequence[str], row: int, path: str = '', submission: bool = False) -> Annotation:
  """One CSV row (26 cells) -> Annotation; raises CsvFormatError naming row and image.

  An annotation marks only its category's keypoints: an annotated cell of another keypoint is an error.
  A submission (`submission`) may fill every cell (a 24-output model does): such cells are read as
  absent and named in `Annotation.ignored`, as every FashionAI scorer ignores them.
  """
  image_id = cells[0].strip() if cells else ''
  where = f'{path}: row {row} ({image_id or "no image id"}): '
  if len(cells) != len(HEADER):
    raise CsvFormatError(f'{where}has {len(cells)} columns; expected {len(HEADER)} (image_id, image_category '
                         f'and the 24 keypoints)')
  category = cells[1].strip()
  if category not in kp.CATEGORIES:
    raise CsvFormatError(f'{where}unknown category {category!r}; expected one of {", ".join(kp.CATEGORIES)}')
  xy = np.full((kp.NUM_KEYPOINTS, 2), -1, np.float32)
  vis = np.full((kp.NUM_KEYPOINTS,), -1, np.int32)
  for j, cell in enumerate(cells[2:]):
    x, y, v = parse_cell(cell, where + f'{kp.KEYPOINT_NAMES[j]}: ')
    xy[j] = (x, y)
    vis[j] = v
  outside = np.flatnonzero((vis >= 0) & ~kp.category_mask(category))
  if outside.size and not submission:
    raise CsvFormatError(f'{where}{category} has no keypoint {kp.KEYPOINT_NAMES[outside[0]]}, but the cell is '
                         f'annotated; expected -1_-1_-1')
  xy[outside], vis[outside] = -1, -1
  return Annotation(image_id, category, xy, vis, row, tuple(kp.KEYPOINT_NAMES[j] for j in outside))


def read_annotations(path: str, submission: bool = False) -> Iterator[Annotation]:
  """The rows of an annotated FashionAI CSV (train.csv and the like), or of a submission (`submission`,
  see parse_row), in file order.

  Raises CsvFormatError at the first malformed row; callers that skip bad rows catch it per row via
  `iter_annotations(path, errors)`.
  """
  yield from iter_annotations(path, errors=None, submission=submission)


def iter_annotations(path: str, errors: list[str] | None, submission: bool = False) -> Iterator[Annotation]:
  """Like read_annotations; with a list for `errors`, bad rows are described there and skipped."""
  header, rows = _open_rows(path)
  if tuple(header) != HEADER:
    raise CsvFormatError(f'{path}: row 1: the header has {len(header)} columns {header[:4]}...; expected '
                         f'image_id,image_category and the 24 keypoint names in the official order')
  for row, cells in rows:
    try:
      yield parse_row(cells, row, path, submission)
    except CsvFormatError as e:
      if errors is None:
        raise
      errors.append(str(e))


def read_categories(path: str) -> dict[str, str]:
  """{image_id: category} from a CSV whose first two columns are image_id,image_category (test.csv)."""
  _, rows = _open_rows(path)
  out: dict[str, str] = {}
  for row, cells in rows:
    image_id = cells[0].strip() if cells else ''
    if len(cells) < 2 or not image_id:
      raise CsvFormatError(f'{path}: row {row}: expected image_id,image_category')
    category = cells[1].strip()
    if category not in kp.CATEGORIES:
      raise CsvFormatError(f'{path}: row {row} ({image_id}): unknown category {category!r}; expected one of '
                           f'{", ".join(kp.CATEGORIES)}')
    if image_id in out:
      raise CsvFormatError(f'{path}: row {row}: image {image_id} is listed twice')
    out[image_id] = category
  return out


def format_submission(rows: Sequence[tuple[str, str, Sequence[str]]]) -> str:
  """CSV text from (image_id, category, 24 cells) rows, with the official header."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(HEADER)
  for image_id, category, cells in rows:
    if len(cells) != kp.NUM_KEYPOINTS:
      raise ValueError(f'{image_id}: {len(cells)} keypoint cells; expected {kp.NUM_KEYPOINTS}')
    writer.writerow([image_id, category, *cells])
  return buf.getvalue()


def annotation_cells(keypoints: np.ndarray, visibility: np.ndarray) -> list[str]:
  """24 `x_y_v` cells from (24, 2) pixels and (24,) visibility."""
  return [format_cell(x, y, v) for (x, y), v in zip(np.asarray(keypoints), np.asarray(visibility))]
