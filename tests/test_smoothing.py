"""vidtag.smoothing: the spherical median over +-N frames of each sequence's answers."""

import numpy as np
import pytest
import torch

from vidtag.errors import InferenceError
from vidtag.geo import haversine_km
from vidtag.smoothing import smooth_tracks


def line(n, lat0=52.37, lon0=4.90, step_deg=0.0005):
    """(n, 2) a straight drive north, ~55 m per frame."""
    return np.stack([lat0 + step_deg * np.arange(n), np.full(n, lon0)], axis=1)


def smooth(track, half, valid=None):
    t = torch.as_tensor(np.asarray(track))[None]
    v = torch.ones(t.shape[:2], dtype=torch.bool) if valid is None else torch.as_tensor(valid)[None]
    return smooth_tracks(t, v, half)[0].numpy()


def test_a_burst_to_another_city_is_outvoted_and_the_drive_is_kept():
    track = line(60)
    noisy = track.copy()
    noisy[20:25] = [35.68, 139.69]  # five frames in Tokyo (Fig. 4's burst)
    out = smooth(noisy, 10)
    err = haversine_km(out[:, 0], out[:, 1], track[:, 0], track[:, 1])
    assert err.max() < 0.3  # no frame left in Tokyo, none dragged between the cities
    span = haversine_km(out[0, 0], out[0, 1], out[-1, 0], out[-1, 1])
    assert span > 2.5  # the drive still moves (~3.3 km long)


def test_a_straight_drive_is_unchanged_and_jitter_shrinks():
    track = line(41)
    out = smooth(track, 5)
    np.testing.assert_allclose(out[5:-5], track[5:-5], atol=1e-9)  # the median of a straight run is its centre
    assert (out[:5, 0] > track[:5, 0]).all()  # windows are cut at the ends (no repeated frames): the ends move in
    rng = np.random.default_rng(0)
    jitter = track + rng.normal(scale=0.005, size=track.shape)  # ~0.5 km noise per frame
    before = haversine_km(jitter[:, 0], jitter[:, 1], track[:, 0], track[:, 1]).mean()
    out = smooth(jitter, 10)
    after = haversine_km(out[:, 0], out[:, 1], track[:, 0], track[:, 1]).mean()
    assert after < 0.5 * before


def test_zero_is_the_identity_and_padding_is_neither_read_nor_written():
    track = line(8)
    np.testing.assert_array_equal(smooth(track, 0), track)
    valid = np.array([True] * 5 + [False] * 3)
    padded = track.copy()
    padded[5:] = [-10.0, 100.0]  # garbage under the padding
    out = smooth(padded, 3, valid)
    np.testing.assert_allclose(out[:5], smooth(track[:5], 3), atol=1e-12)  # the same as the 5 frames alone
    np.testing.assert_array_equal(out[5:], padded[5:])


def test_rows_are_separate_sequences():
    a, b = line(10), line(10, lat0=-33.87, lon0=151.21)
    both = smooth_tracks(torch.as_tensor(np.stack([a, b])), torch.ones(2, 10, dtype=torch.bool), 4).numpy()
    np.testing.assert_allclose(both[0], smooth(a, 4), atol=1e-12)
    np.testing.assert_allclose(both[1], smooth(b, 4), atol=1e-12)


def test_the_antimeridian_and_the_pole_are_ordinary_places():
    lon = np.array([179.990, 179.995, -179.999, -179.994, -179.990])
    track = np.stack([np.full(5, -16.5), lon], axis=1)  # Fiji, crossing 180 degrees east to west
    out = smooth(track, 2)
    assert np.abs(np.abs(out[:, 1]) - 180.0).max() < 0.02  # never averaged to longitude ~0
    polar = np.stack([np.full(5, 89.999), np.array([0.0, 90.0, 180.0, -90.0, 0.0])], axis=1)
    assert (smooth(polar, 2)[:, 0] > 89.99).all()


@pytest.mark.parametrize("half", [-1, 1.5, True])
def test_bad_window_is_refused(half):
    with pytest.raises(InferenceError, match="smooth_frames"):
        smooth(line(4), half)


def test_sequences_stored_one_after_another_are_smoothed_apart():
    from vidtag.smoothing import smooth_sequences

    a, b, c = line(7), line(3, lat0=-33.87, lon0=151.21), line(12, lat0=40.0, lon0=-74.0)
    out = smooth_sequences(np.concatenate([a, b, c]), [0, 7, 10, 22], 2).numpy()
    np.testing.assert_allclose(out[:7], smooth(a, 2), atol=1e-12)
    np.testing.assert_allclose(out[7:10], smooth(b, 2), atol=1e-12)
    np.testing.assert_allclose(out[10:], smooth(c, 2), atol=1e-12)
    with pytest.raises(InferenceError, match="offsets"):
        smooth_sequences(np.concatenate([a, b]), [0, 7, 11], 2)  # 10 rows, offsets for 11
