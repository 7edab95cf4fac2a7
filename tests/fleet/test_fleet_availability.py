import pytest
import torch

from coevo.fleet import Availability, always_available, diurnal_availability

HOUR = 3600.0


def window(offset_h, start_h, end_h, dropout_rate=0.0):
    def one(value):
        return torch.tensor([value], dtype=torch.float64)

    return Availability(one(offset_h), one(start_h), one(end_h), one(dropout_rate))


@pytest.mark.parametrize(
    ("hour_utc", "expected"),
    [(23, True), (5, True), (22, True), (0, True), (12, False), (6, False), (21.9, False)],
)
def test_window_wrapping_midnight(hour_utc, expected):
    assert window(0, 22, 6).available(hour_utc * HOUR).tolist() == [expected]


@pytest.mark.parametrize(
    ("hour_utc", "expected"), [(20, True), (3, True), (4, False), (21, True), (19, False)]
)
def test_timezone_offset_shifts_the_window(hour_utc, expected):
    # Local 22 -> 6 at UTC+2 is 20 -> 4 UTC.
    assert window(2, 22, 6).available(hour_utc * HOUR).tolist() == [expected]


def test_negative_offset_and_later_days():
    # Local 22 at UTC-5 is 03:00 UTC; the same hour on day 3 behaves the same.
    assert window(-5, 22, 6).available(3 * HOUR).tolist() == [True]
    assert window(-5, 22, 6).available((3 * 24 + 3) * HOUR).tolist() == [True]
    assert window(-5, 22, 6).available((3 * 24 + 12) * HOUR).tolist() == [False]


def test_plain_and_all_day_windows():
    assert window(0, 9, 17).available(12 * HOUR).tolist() == [True]
    assert window(0, 9, 17).available(17 * HOUR).tolist() == [False]
    assert window(0, 0, 24).available(23.99 * HOUR).tolist() == [True]
    assert window(0, 5, 5).available(4 * HOUR).tolist() == [True]
    assert bool(always_available(4).available(7 * HOUR).all())


def test_share_available_is_about_window_over_day():
    availability = diurnal_availability(20_000, 0, window_h=8.0)
    times = torch.rand(40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shares = [availability.available(t * 7 * 24 * HOUR).double().mean().item() for t in times]
    assert sum(shares) / len(shares) == pytest.approx(8 / 24, abs=0.03)


def test_full_day_window_is_always_available():
    assert bool(diurnal_availability(100, 0, window_h=24.0).available(11 * HOUR).all())


def test_diurnal_is_deterministic_per_seed():
    first, again = diurnal_availability(50, 3), diurnal_availability(50, 3)
    assert torch.equal(first.active_start_h, again.active_start_h)
    assert torch.equal(first.timezone_offset_h, again.timezone_offset_h)
    assert not torch.equal(first.active_start_h, diurnal_availability(50, 4).active_start_h)


def test_dropouts_follow_the_rate_and_the_generator():
    availability = diurnal_availability(10_000, 0, dropout_rate=0.05)
    devices = torch.arange(10_000)
    dropped = availability.dropouts(devices, torch.Generator().manual_seed(5))
    assert dropped.double().mean().item() == pytest.approx(0.05, abs=0.01)
    again = availability.dropouts(devices, torch.Generator().manual_seed(5))
    assert torch.equal(dropped, again)
    assert not torch.equal(
        dropped, availability.dropouts(devices, torch.Generator().manual_seed(6))
    )


def test_dropouts_use_each_device_rate():
    never, always = window(0, 0, 24, 0.0), window(0, 0, 24, 1.0)
    generator = torch.Generator().manual_seed(0)
    assert never.dropouts(torch.tensor([0, 0, 0]), generator).tolist() == [False] * 3
    assert always.dropouts(torch.tensor([0, 0]), generator).tolist() == [True] * 2


def test_select_keeps_the_chosen_devices():
    availability = diurnal_availability(10, 2)
    chosen = availability.select(torch.tensor([7, 2]))
    assert chosen.active_start_h.tolist() == availability.active_start_h[[7, 2]].tolist()
    with pytest.raises(ValueError, match="1-D integer"):
        availability.select(torch.tensor([0.5]))


def test_out_of_range_fields_are_rejected():
    with pytest.raises(ValueError, match=r"active_start_h must be in \[0.0, 24.0\], got 25.0"):
        window(0, 25, 6)
    with pytest.raises(ValueError, match="dropout_rate"):
        window(0, 22, 6, dropout_rate=1.5)
    with pytest.raises(ValueError, match="window_h"):
        diurnal_availability(10, 0, window_h=0.0)
