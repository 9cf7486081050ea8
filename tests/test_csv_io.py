"""kpjax.data.fashionai_csv cells: integer and decimal coordinates, clear refusals, and what rounding costs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kpjax.data import fashionai_csv as csv_io


@pytest.mark.parametrize('cell,want', [
    ('266_286_1', (266.0, 286.0, 1)),
    ('266.03_286.18_1', (266.03, 286.18, 1)),
    (' 0.5_.25_0 ', (0.5, 0.25, 0)),
    ('12._7.000_1', (12.0, 7.0, 1)),
    ('2.5e2_1E1_1', (250.0, 10.0, 1)),
    ('-1_-1_-1', (-1.0, -1.0, -1)),
    ('-1.0_-1.00_-1', (-1.0, -1.0, -1)),
    ('-0.0_3_1', (0.0, 3.0, 1)),
])
def test_cells_with_integer_or_decimal_coordinates(cell, want):
  got = csv_io.parse_cell(cell)
  assert got == want and isinstance(got[2], int)
  assert got[0] != 0 or math.copysign(1.0, got[0]) == 1.0  # no negative zero reaches the scores


@pytest.mark.parametrize('cell,message', [
    ('nan_3_1', 'malformed keypoint cell'),
    ('3_inf_1', 'malformed keypoint cell'),
    ('1e999_3_1', 'too large to be a pixel'),
    ('3_4_1.0', 'malformed keypoint cell'),  # visibility stays an integer
    ('3_4_2', 'visibility 2'),
    ('3,5_4_1', 'malformed keypoint cell'),
    ('3_4', 'malformed keypoint cell'),
    ('3_4_1_1', 'malformed keypoint cell'),
    ('0x1f_4_1', 'malformed keypoint cell'),
    ('\u0663_4_1', 'malformed keypoint cell'),  # an Arabic-Indic digit: float() would take it
    ('12_abc_1', 'malformed keypoint cell'),
    ('-0.5_4_1', 'negative position'),
    ('2.5_-1_-1', 'absent'),
])
def test_bad_cells_are_refused_by_name(cell, message):
  with pytest.raises(csv_io.CsvFormatError, match=message) as info:
    csv_io.parse_cell(cell, 'f.csv: row 3 (x.jpg): armpit_left: ')
  assert str(info.value).startswith('f.csv: row 3 (x.jpg): armpit_left: ')


def test_format_cells():
  assert csv_io.format_cell(266.034, 286.175, 1) == '266_286_1'  # the challenge's integers by default
  assert csv_io.format_cell(266.034, 286.176, 1, decimals=2) == '266.03_286.18_1'
  assert csv_io.format_cell(2.5, 3.5, 0) == '2_4_0'  # half to even, as before
  assert csv_io.format_cell(-0.001, 7, 1, decimals=2) == '0.00_7.00_1'
  assert csv_io.format_cell(3, 4, -1, decimals=3) == csv_io.ABSENT_CELL
  with pytest.raises(ValueError, match='decimals'):
    csv_io.format_cell(1, 2, 1, decimals=-1)
  with pytest.raises(ValueError, match='cannot write'):
    csv_io.format_cell(float('nan'), 2, 1)


@pytest.mark.parametrize('decimals', [0, 1, 2, 4])
def test_rounding_cost_written_and_read_back(decimals):
  """Points uniform in the image, written with `decimals` digits and read back: the mean distance to the
  point is the mean distance from a uniform point of a square of side q = 10^-decimals to its centre,
  q (sqrt(2) + ln(1 + sqrt(2))) / 6 (0.3826 px for whole pixels); the largest is q / sqrt(2)."""
  rng = np.random.default_rng(decimals)
  points = rng.uniform(0, 512, (20000, 2))
  back = np.array([csv_io.parse_cell(csv_io.format_cell(x, y, 1, decimals))[:2] for x, y in points])
  distance = np.linalg.norm(back - points, axis=-1)
  q = 10.0 ** -decimals
  analytic = q * (math.sqrt(2) + math.log(1 + math.sqrt(2))) / 6
  assert analytic == pytest.approx(0.382598 * q, rel=1e-5)
  assert distance.mean() == pytest.approx(analytic, rel=0.01)  # standard error ~0.4% at 20,000 points
  assert distance.max() <= q / math.sqrt(2) * (1 + 1e-9) + 1e-12


def test_a_submission_may_fill_cells_outside_the_category_an_annotation_may_not():
  from kpjax.data import keypoints as kp  # pylint: disable=g-import-not-at-top
  cells = ['Images/skirt/a.jpg', 'skirt'] + [f'{j}_{j + 1}_1' for j in range(kp.NUM_KEYPOINTS)]
  with pytest.raises(csv_io.CsvFormatError, match=r'f.csv: row 2 \(Images/skirt/a.jpg\): skirt has no keypoint '
                                                  'neckline_left, but the cell is annotated'):
    csv_io.parse_row(cells, 2, 'f.csv')
  row = csv_io.parse_row(cells, 2, 'f.csv', submission=True)
  own = kp.category_mask('skirt')
  assert row.ignored == tuple(n for n, m in zip(kp.KEYPOINT_NAMES, own) if not m) and len(row.ignored) == 20
  np.testing.assert_array_equal(row.visibility, np.where(own, 1, -1))
  np.testing.assert_array_equal(row.keypoints[~own], -1)
  np.testing.assert_array_equal(row.keypoints[own], [[j, j + 1] for j in np.flatnonzero(own)])
