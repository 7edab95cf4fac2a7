import coevo.fleet


def test_fleet_all_is_sorted_and_importable():
    exported = coevo.fleet.__all__
    assert len(set(exported)) == len(exported)
    assert list(exported) == sorted(
        exported, key=lambda s: (not s.isupper(), not s[:1].isupper(), s)
    )
    for symbol in exported:
        assert hasattr(coevo.fleet, symbol), symbol
