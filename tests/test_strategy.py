"""Tests of datosd.strategy: the per-step (cache depth, prune ratio) strategy (spec 1, 7.9)."""
from pathlib import Path

import pytest

from datosd import Strategy, StrategyError

REPO = Path(__file__).resolve().parents[1]
B1 = REPO / "configs" / "dato" / "b1.yaml"

# Spec section 1, copied by hand: Table 6 "Ours-b1" read right to left = step order i = 0..49.
SPEC_B1_DEPTH = [0,1,1,1,1,1,12,1,1,1, 1,1,1,1,1,1,0,0,12,1, 1,0,12,1,0,1,1,1,1,1, 12,0,0,1,1,1,1,1,1,1, 1,12,1,1,1,1,1,1,1,1]  # noqa: E231,E501
SPEC_B1_RATIO = [0.5,0.6,0.5,0.6,0.7,0.6,0.5,0.3,0.5,0.4, 0.4,0.3,0.4,0.4,0.6,0.5,0.3,0.3,0.6,0.6, 0.3,0.6,0.5,0.6,0.3,0.4,0.3,0.4,0.3,0.5, 0.5,0.6,0.3,0.7,0.4,0.5,0.5,0.6,0.3,0.5, 0.5,0.6,0.5,0.6,0.5,0.3,0.4,0.4,0.5,0.7]  # noqa: E231,E501


def test_b1_matches_spec():
    s = Strategy.load(B1)
    assert s.steps == 50 and len(SPEC_B1_DEPTH) == 50
    assert s.cache_depth == SPEC_B1_DEPTH
    assert s.prune_ratio == SPEC_B1_RATIO
    assert all(type(d) is int for d in s.cache_depth)
    assert s.name == "b1"
    assert s.meta.get("sampler") == "plms"
    s.check_steps(50)


def test_b1_summary_counts():
    s = Strategy.load(B1)
    full = partial = reused = 0
    for i, d in enumerate(SPEC_B1_DEPTH):
        if d == 12 or i == 0:  # step 0 always computes everything (spec 2)
            full += 1
        elif d == 0:
            reused += 1
        else:
            partial += 1
    summary = s.summary()
    assert (summary.steps, summary.full, summary.partial, summary.reused) == (50, full, partial, reused)
    assert (full, partial, reused) == (6, 38, 6)
    assert summary.mean_ratio == pytest.approx(sum(SPEC_B1_RATIO) / 50)
    line = s.describe()
    assert "\n" not in line
    for part in ("b1", "50 steps", f"{full} full", f"{partial} partial", f"{reused} reused"):
        assert part in line


def test_save_load_round_trip(tmp_path):
    for s in (Strategy.load(B1), Strategy.uniform(20, 3, 1, ratio=0.4), Strategy([0, 12], [0.0, 0.25], name=None)):
        path = tmp_path / "sub" / "s.yaml"
        s.save(path)
        back = Strategy.load(path)
        assert back.cache_depth == s.cache_depth
        assert back.prune_ratio == s.prune_ratio
        assert back.meta == s.meta
        assert back.name == (s.name if s.name is not None else "s")  # the file stem when unnamed
        text = path.read_text()
        assert "steps: %d" % s.steps in text


def test_uniform_deepcache_pattern():
    s = Strategy.uniform(50, 3, 1)
    assert s.steps == 50
    assert s.cache_depth == [12 if i % 3 == 0 else 1 for i in range(50)]
    assert s.cache_depth[:7] == [12, 1, 1, 12, 1, 1, 12]
    assert s.prune_ratio == [0.0] * 50
    summary = s.summary()
    assert (summary.full, summary.partial, summary.reused) == (17, 33, 0)
    assert Strategy.uniform(10, 5, 0, ratio=0.3).cache_depth == [12, 0, 0, 0, 0, 12, 0, 0, 0, 0]
    assert Strategy.uniform(10, 5, 0, ratio=0.3).prune_ratio == [0.3] * 10
    with pytest.raises(StrategyError, match="interval"):
        Strategy.uniform(10, 0, 1)


def test_full_and_constant_ratio():
    s = Strategy.full(25)
    assert s.cache_depth == [12] * 25 and s.prune_ratio == [0.0] * 25
    assert s.summary().full == 25 and s.summary().mean_ratio == 0.0
    c = Strategy.constant_ratio(4, 0.5)
    assert c.cache_depth == [12] * 4 and c.prune_ratio == [0.5] * 4


def test_check_steps_never_stretches():
    s = Strategy.load(B1)
    with pytest.raises(StrategyError) as e:
        s.check_steps(25)
    msg = str(e.value)
    assert "50" in msg and "25" in msg and "never stretched" in msg


@pytest.mark.parametrize(
    "depth, ratio, fragments",
    [
        ([12] * 50, [0.5] * 49, ["cache_depth has 50", "prune_ratio has 49", "same length"]),
        ([12, 1, 1, 1], [0.5, 0.5, 0.5, 1.2], ["prune_ratio[3] = 1.2", "[0, 1)"]),
        ([12, 1, 1], [0.5, -0.1, 0.5], ["prune_ratio[1] = -0.1", "[0, 1)"]),
        ([12, 13], [0.5, 0.5], ["cache_depth[1] = 13", "0..12"]),
        ([12, -1], [0.5, 0.5], ["cache_depth[1] = -1", "0..12"]),
        ([12, 1], [0.5, float("nan")], ["prune_ratio[1] is NaN"]),
        ([12, 1.5], [0.5, 0.5], ["cache_depth[1] = 1.5", "not an integer"]),
        ([12, float("nan")], [0.5, 0.5], ["cache_depth[1]", "not an integer"]),
        ([12, "1"], [0.5, 0.5], ["cache_depth[1] = '1'", "not a number"]),
        ([12, True], [0.5, 0.5], ["cache_depth[1] = True", "not a number"]),
        ([], [], ["cache_depth is empty"]),
    ],
)
def test_bad_strategies_raise(depth, ratio, fragments):
    with pytest.raises(StrategyError) as e:
        Strategy(depth, ratio, name="bad")
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "'bad'" in msg and "expected" in msg
    for fragment in fragments:
        assert fragment in msg, msg


def test_integral_float_depths_and_tuples_are_normalised():
    s = Strategy((12.0, 1.0), (0, 0.5))  # e.g. from a search that rounds to floats
    assert s.cache_depth == [12, 1] and all(type(d) is int for d in s.cache_depth)
    assert s.prune_ratio == [0.0, 0.5] and all(type(r) is float for r in s.prune_ratio)


def test_bad_yaml_files(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text("steps: 3\ncache_depth: [12, 1]\nprune_ratio: [0.5, 0.5]\n")
    with pytest.raises(StrategyError) as e:
        Strategy.load(path)
    assert str(path) in str(e.value) and "steps is 3" in str(e.value) and "2 entries" in str(e.value)

    path.write_text("cache_depth: [12, 1]\nprune_ratio: [0.5, 0.5]\n")
    with pytest.raises(StrategyError, match="missing key.*steps"):
        Strategy.load(path)

    path.write_text("steps: 2\ncache_depth: [12, 13]\nprune_ratio: [0.5, 0.5]\n")
    with pytest.raises(StrategyError, match=r"short.*cache_depth\[1\] = 13"):
        Strategy.load(path)

    path.write_text("steps: 2\ncache_depth: [12, 1]\nprune_ratio: [0.5, .nan]\n")
    with pytest.raises(StrategyError, match="NaN"):
        Strategy.load(path)

    path.write_text("- 1\n- 2\n")
    with pytest.raises(StrategyError, match="not a mapping"):
        Strategy.load(path)


def test_b1_table_order_is_b1_reversed():
    """The shipped left-to-right reading of Table 6 is b1 reversed, step for step."""
    table_order = Strategy.load(REPO / "configs" / "dato" / "b1-table-order.yaml")
    b1 = Strategy.load(B1)
    assert table_order.cache_depth == b1.cache_depth[::-1]
    assert table_order.prune_ratio == b1.prune_ratio[::-1]
    assert table_order.cache_depth[:10] == [1, 1, 1, 1, 1, 1, 1, 1, 12, 1]


def test_unknown_keys_are_refused_naming_the_known_ones(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("steps: 2\ncache_depth: [12, 1]\nprune_ratio: [0.5, 0.5]\ncache_dept: [12, 0]\n")
    with pytest.raises(StrategyError) as e:
        Strategy.load(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "unknown key(s) cache_dept" in message
    assert "steps, cache_depth, prune_ratio" in message and "sampler" in message
    # the metadata keys the shipped files, the search and the derivations write are kept
    searched = Strategy([12, 1], [0.5, 0.4], name="searched-depth",
                        meta={"sampler": "plms", "sampler_steps_arg": 2, "source": "dato_search", "w_M": 0.1,
                              "quality": {"kind": "fidelity", "value": 1.0}, "latency_ms": 3.0, "select": "raw"})
    searched.last(1).save(tmp_path / "derived.yaml")
    back = Strategy.load(tmp_path / "derived.yaml")
    assert back.meta == dict(searched.meta, derived_from="searched-depth", derivation="last 1 steps")


def test_a_folder_or_a_binary_file_is_named_in_one_line(tmp_path):
    from datosd.strategy import find_strategy, load_strategy

    folder = tmp_path / "strategies"
    folder.mkdir()
    for call in (find_strategy, load_strategy, Strategy.load):
        with pytest.raises(StrategyError) as e:
            call(folder)
        assert str(e.value).startswith(f"strategy {folder} is a folder, not a strategy file")
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"\x00\x01steps: 2\n")
    for path in (binary, nul):
        with pytest.raises(StrategyError) as e:
            load_strategy(path)
        assert str(e.value).startswith(f"strategy file {path} is not a text YAML file") and "\n" not in str(e.value)
