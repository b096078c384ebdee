"""Label-free baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsss import baselines


def test_whole_image() -> None:
    m = baselines.whole_image(5, 7)
    assert m.shape == (5, 7) and m.dtype == np.uint8 and m.all()


@pytest.mark.parametrize(("h", "w", "scale"), [(120, 200, 0.8), (97, 64, 0.5), (64, 64, 1.0)])
def test_ellipse_area(h: int, w: int, scale: float) -> None:
    m = baselines.centred_ellipse(h, w, scale)
    assert m.shape == (h, w) and set(np.unique(m)) <= {0, 1}
    assert m.mean() == pytest.approx(math.pi / 4 * scale**2, rel=0.03)
    # centred: symmetric under both flips
    assert (m == m[::-1]).all() and (m == m[:, ::-1]).all()


def test_bad_sizes() -> None:
    with pytest.raises(ValueError):
        baselines.centred_ellipse(0, 5, 0.8)
    with pytest.raises(ValueError):
        baselines.centred_ellipse(5, 5, scale=0)
