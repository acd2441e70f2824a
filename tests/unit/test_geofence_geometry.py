"""Geofence geometry and the stale-position decision, as pure functions: no broker, no Redis."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from tasks.geofence import (
    AssetState,
    Circle,
    DefineGeofence,
    LatLon,
    Polygon,
    RecordPosition,
    contains,
    decide,
    haversine_m,
    is_stale,
    point_in_polygon,
)

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
BERLIN = LatLon(lat=52.5200, lon=13.4050)
#: an L-shaped (concave) block: a 2 x 2 square missing its north-east quarter
L_SHAPE = (
    LatLon(lat=0, lon=0),
    LatLon(lat=0, lon=2),
    LatLon(lat=1, lon=2),
    LatLon(lat=1, lon=1),
    LatLon(lat=2, lon=1),
    LatLon(lat=2, lon=0),
)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_haversine_matches_known_distances() -> None:
    assert haversine_m(BERLIN, BERLIN) == 0
    one_degree_of_latitude = 2 * math.pi * 6_371_008.8 / 360
    assert haversine_m(LatLon(lat=0, lon=0), LatLon(lat=1, lon=0)) == pytest.approx(
        one_degree_of_latitude
    )
    paris, london = LatLon(lat=48.8566, lon=2.3522), LatLon(lat=51.5074, lon=-0.1278)
    assert haversine_m(paris, london) == pytest.approx(343_500, rel=0.005)
    assert haversine_m(paris, london) == pytest.approx(haversine_m(london, paris))


def test_haversine_is_right_across_the_antimeridian_and_at_the_poles() -> None:
    east, west = LatLon(lat=0, lon=179.999), LatLon(lat=0, lon=-179.999)
    assert haversine_m(east, west) == pytest.approx(222.4, rel=0.01)
    pole = LatLon(lat=90, lon=0)
    assert haversine_m(pole, LatLon(lat=90, lon=123)) == pytest.approx(0, abs=1e-6)


def test_a_circle_contains_what_lies_within_its_radius_boundary_included() -> None:
    depot = Circle(center=BERLIN, radius_m=500)
    assert contains(depot, BERLIN)
    assert contains(depot, LatLon(lat=52.5240, lon=13.4050))  # ~445 m north
    assert not contains(depot, LatLon(lat=52.5250, lon=13.4050))  # ~556 m north
    edge = LatLon(lat=52.5210, lon=13.4050)
    assert contains(Circle(center=BERLIN, radius_m=haversine_m(BERLIN, edge)), edge)


def test_ray_casting_tells_inside_from_outside_in_a_concave_polygon() -> None:
    assert point_in_polygon(LatLon(lat=0.5, lon=0.5), L_SHAPE)
    assert point_in_polygon(LatLon(lat=0.5, lon=1.5), L_SHAPE)
    assert point_in_polygon(LatLon(lat=1.5, lon=0.5), L_SHAPE)
    assert not point_in_polygon(LatLon(lat=1.5, lon=1.5), L_SHAPE)  # the missing quarter
    assert not point_in_polygon(LatLon(lat=-0.5, lon=0.5), L_SHAPE)
    assert not point_in_polygon(LatLon(lat=0.5, lon=2.5), L_SHAPE)
    assert not point_in_polygon(LatLon(lat=1.0, lon=3.0), L_SHAPE)  # level with a vertex
    assert contains(Polygon(vertices=L_SHAPE), LatLon(lat=0.5, lon=0.5))


def test_a_closed_ring_repeating_its_first_vertex_means_the_same_polygon() -> None:
    closed = (*L_SHAPE, L_SHAPE[0])
    for lat, lon in [(0.5, 0.5), (1.5, 1.5), (1.5, 0.5), (3, 3)]:
        point = LatLon(lat=lat, lon=lon)
        assert point_in_polygon(point, closed) == point_in_polygon(point, L_SHAPE)


def test_coordinates_out_of_range_or_not_numbers_are_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="lat"):
        LatLon(lat=90.5, lon=0)
    with pytest.raises(ValidationError, match="lon"):
        LatLon(lat=0, lon=-180.1)
    with pytest.raises(ValidationError, match="lat"):
        LatLon(lat=math.nan, lon=0)
    with pytest.raises(ValidationError, match="lon"):
        RecordPosition(asset_id=uuid.uuid4(), lat=0, lon=math.inf, at=T0)


def test_a_shape_is_a_circle_with_a_positive_radius_or_a_polygon_of_three_vertices() -> None:
    with pytest.raises(ValidationError, match="radius_m"):
        Circle(center=BERLIN, radius_m=0)
    with pytest.raises(ValidationError, match="at least 3"):
        Polygon(vertices=L_SHAPE[:2])
    with pytest.raises(ValidationError, match="antimeridian"):
        Polygon(vertices=(LatLon(lat=0, lon=179), LatLon(lat=1, lon=-179), LatLon(lat=1, lon=179)))


def test_the_shape_travels_as_json_and_comes_back_as_the_same_kind() -> None:
    circle = DefineGeofence(
        geofence_id="depot", name="Depot", shape=Circle(center=BERLIN, radius_m=5)
    )
    polygon = DefineGeofence(geofence_id="yard", name="Yard", shape=Polygon(vertices=L_SHAPE))
    for command in (circle, polygon):
        assert DefineGeofence.model_validate(command.payload()) == command
    assert circle.payload()["shape"]["kind"] == "circle"
    with pytest.raises(ValidationError, match="kind"):
        DefineGeofence.model_validate(
            {"geofence_id": "x", "name": "x", "shape": {"kind": "square", "side_m": 3}}
        )


def test_a_position_needs_a_timezone_and_is_partitioned_by_asset() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        RecordPosition(asset_id=uuid.uuid4(), lat=0, lon=0, at=datetime(2026, 11, 23, 9, 0))
    assert RecordPosition.__partition_key__ == "asset_id"


def test_a_position_no_later_than_the_last_applied_one_is_stale() -> None:
    assert not is_stale(at(0), None)
    assert not is_stale(at(1), at(0))
    assert is_stale(at(0), at(0))  # a duplicate
    assert is_stale(at(-1), at(0))  # out of order
    assert is_stale(at(0).astimezone(datetime.now().astimezone().tzinfo), at(0))


SHAPES: dict[str, Circle | Polygon] = {
    "depot": Circle(center=BERLIN, radius_m=500),
    "block": Polygon(vertices=L_SHAPE),
}
IN_DEPOT, OUTSIDE = BERLIN, LatLon(lat=10, lon=10)


def test_the_first_position_enters_what_it_is_inside_and_exits_nothing() -> None:
    decision = decide(None, IN_DEPOT, at(0), SHAPES)
    assert (decision.stale, decision.entered, decision.exited) == (False, ("depot",), ())
    assert decide(None, OUTSIDE, at(0), SHAPES).entered == ()


def test_a_newer_position_reports_exactly_the_differences() -> None:
    inside = AssetState(at(0), frozenset({"depot"}))
    assert decide(inside, IN_DEPOT, at(1), SHAPES).entered == ()
    assert decide(inside, IN_DEPOT, at(1), SHAPES).exited == ()
    moved = decide(inside, LatLon(lat=0.5, lon=0.5), at(1), SHAPES)
    assert (moved.entered, moved.exited, moved.inside) == (
        ("block",),
        ("depot",),
        frozenset({"block"}),
    )


def test_a_stale_position_changes_nothing_and_reports_no_crossing() -> None:
    inside = AssetState(at(5), frozenset({"depot"}))
    for when in (at(5), at(4)):  # a duplicate, then an older position from elsewhere
        decision = decide(inside, OUTSIDE, when, SHAPES)
        assert decision.stale
        assert (decision.entered, decision.exited, decision.inside) == (
            (),
            (),
            frozenset({"depot"}),
        )


def test_a_geofence_removed_since_the_last_position_is_forgotten_not_exited() -> None:
    inside = AssetState(at(0), frozenset({"depot", "gone"}))
    decision = decide(inside, OUTSIDE, at(1), SHAPES)
    assert decision.exited == ("depot",)
    assert decision.inside == frozenset()


def test_crossings_come_sorted_so_a_rerun_publishes_them_in_the_same_order() -> None:
    shapes: dict[str, Circle | Polygon] = {
        name: Circle(center=BERLIN, radius_m=10) for name in ("c", "a", "b")
    }
    assert decide(None, BERLIN, at(0), shapes).entered == ("a", "b", "c")
    assert decide(AssetState(at(0), frozenset(shapes)), OUTSIDE, at(1), shapes).exited == (
        "a",
        "b",
        "c",
    )
