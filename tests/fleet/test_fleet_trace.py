import dataclasses
import re

import pytest
import torch

from coevo.fleet import diurnal_availability, load_trace, sample_profiles
from coevo.fleet.profiles import QUANTITIES

HEADER = (
    "device_id,tier,compute_flops_per_s,memory_bytes,uplink_bytes_per_s,"
    "downlink_bytes_per_s,rtt_s,energy_per_flop_j,energy_per_byte_j"
)


def write(tmp_path, *rows, header=HEADER):
    path = tmp_path / "trace.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_sampled_fleet_round_trips_through_csv(tmp_path):
    profiles = sample_profiles(50, None, 0)
    profiles.to_csv(tmp_path / "fleet.csv")
    loaded = load_trace(tmp_path / "fleet.csv")
    assert loaded.tier_labels() == profiles.tier_labels()
    for name in QUANTITIES:
        assert torch.equal(getattr(loaded, name), getattr(profiles, name)), name
    assert loaded.availability is None


def test_availability_columns_round_trip(tmp_path):
    availability = diurnal_availability(20, 1)
    profiles = sample_profiles(20, None, 1)
    with_windows = dataclasses.replace(profiles, availability=availability)
    with_windows.to_csv(tmp_path / "fleet.csv")
    loaded = load_trace(tmp_path / "fleet.csv").availability
    assert loaded is not None
    for name in ("timezone_offset_h", "active_start_h", "active_end_h", "dropout_rate"):
        assert torch.equal(getattr(loaded, name), getattr(availability, name)), name


def test_rows_out_of_order_are_sorted_by_device_id(tmp_path):
    path = write(
        tmp_path,
        "2,car,3e9,8e9,1e6,2e6,0.08,6e-10,3e-7",
        "0,laptop,1e9,8e9,1e6,2e6,0.02,2e-10,1e-7",
        "1,car,2e9,8e9,1e6,2e6,0.08,6e-10,3e-7",
    )
    profiles = load_trace(path)
    assert profiles.compute_flops_per_s.tolist() == [1e9, 2e9, 3e9]
    assert profiles.tier_labels() == ["laptop", "car", "car"]
    assert profiles.tier_names == ("car", "laptop")


def test_negative_bandwidth_names_file_line_column_and_limit(tmp_path):
    path = write(
        tmp_path,
        "0,car,1e9,8e9,1e6,2e6,0.08,6e-10,3e-7",
        "1,car,1e9,8e9,-3,2e6,0.08,6e-10,3e-7",
    )
    with pytest.raises(ValueError) as info:
        load_trace(path)
    assert str(info.value) == f"{path} line 3: uplink_bytes_per_s must be > 0, got -3"


def test_missing_column_names_the_column(tmp_path):
    path = write(tmp_path, "0,car,1e9,8e9,1e6,2e6,6e-10,3e-7", header=HEADER.replace(",rtt_s", ""))
    with pytest.raises(ValueError, match=r"trace.csv line 1: missing column\(s\) \['rtt_s'\]"):
        load_trace(path)


def test_non_number_names_line_and_column(tmp_path):
    path = write(
        tmp_path,
        "0,car,1e9,8e9,1e6,2e6,0.08,6e-10,3e-7",
        "1,car,1e9,8e9,1e6,2e6,0.08,6e-10,3e-7",
        "2,car,1e9,lots,1e6,2e6,0.08,6e-10,3e-7",
    )
    with pytest.raises(
        ValueError, match=re.escape("trace.csv line 4: memory_bytes must be a number, got 'lots'")
    ):
        load_trace(path)


def test_short_row_names_the_empty_cell(tmp_path):
    path = write(tmp_path, "0,car,1e9,8e9,1e6,2e6,0.08,6e-10")
    with pytest.raises(ValueError, match="line 2: energy_per_byte_j must be a number, got ''"):
        load_trace(path)


@pytest.mark.parametrize(
    ("ids", "line", "got"), [((0, 2), 3, "2"), ((0, 0), 3, "0"), ((0, 1.5), 3, "1.5")]
)
def test_device_ids_must_be_zero_to_n_minus_one_once(tmp_path, ids, line, got):
    path = write(tmp_path, *(f"{i},car,1e9,8e9,1e6,2e6,0.08,6e-10,3e-7" for i in ids))
    with pytest.raises(
        ValueError, match=re.escape(f"line {line}: device_id must be each of 0..1 once, got {got}")
    ):
        load_trace(path)


def test_window_columns_come_together(tmp_path):
    path = write(
        tmp_path, "0,car,1e9,8e9,1e6,2e6,0.08,6e-10,3e-7,1.0", header=HEADER + ",timezone_offset_h"
    )
    with pytest.raises(ValueError, match="line 1: give all of"):
        load_trace(path)


def test_window_hours_are_checked_with_their_line(tmp_path):
    path = write(
        tmp_path,
        "0,car,1e9,8e9,1e6,2e6,0.08,6e-10,3e-7,1,22,25",
        header=HEADER + ",timezone_offset_h,active_start_h,active_end_h",
    )
    with pytest.raises(ValueError, match=r"line 2: active_end_h must be in \[0.0, 24.0\], got 25"):
        load_trace(path)


def test_dropout_column_alone_gives_all_day_windows(tmp_path):
    path = write(
        tmp_path, "0,car,1e9,8e9,1e6,2e6,0.08,6e-10,3e-7,0.25", header=HEADER + ",dropout_rate"
    )
    availability = load_trace(path).availability
    assert availability is not None
    assert availability.dropout_rate.tolist() == [0.25]
    assert availability.available(12 * 3600.0).tolist() == [True]


def test_empty_trace_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="no devices"):
        load_trace(write(tmp_path))
