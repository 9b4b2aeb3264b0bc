"""Suite loading errors point at file, line and field; samples are stratified and repeatable."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from canaryflow.errors import ConfigError
from canaryflow.evaluation.suites import (
    EvalItem,
    available_suites,
    load_suite,
    stratified_sample,
)


def item(i: int, kind: str = "fact", **overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "id": f"t-{i:04d}",
        "suite": "t",
        "kind": kind,
        "input": f"question {i}",
        "scorer": "reference_fact",
        "expected": {"answer": "Paris"},
        "tags": ["geo"],
    }
    data.update(overrides)
    return data


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loads_items_from_a_path(tmp_path: Path) -> None:
    path = write(tmp_path, [json.dumps(item(1)), "", json.dumps(item(2, "safety"))])
    suite = load_suite(path)
    assert suite.name == "t" and len(suite) == 2
    assert [i.kind for i in suite.items] == ["fact", "safety"]
    assert suite.items[0].tags == ("geo",)


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, [json.dumps(item(1)), '{"id": "t-2", "kind": '])
    with pytest.raises(ConfigError, match=rf"{path}:2: not valid JSON"):
        load_suite(path)


def test_unknown_scorer_names_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, [json.dumps(item(1)), json.dumps(item(2, scorer="vibes"))])
    with pytest.raises(ConfigError, match=rf"{path}:2: field scorer: Input should be 'exact'"):
        load_suite(path)


def test_unknown_field_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, [json.dumps(item(1, colour="red"))])
    with pytest.raises(ConfigError, match=r":1: field colour: Extra inputs are not permitted"):
        load_suite(path)


def test_expected_must_fit_the_scorer(tmp_path: Path) -> None:
    path = write(tmp_path, [json.dumps(item(1, scorer="regex", expected={"text": "x"}))])
    with pytest.raises(ConfigError, match=r":1: .*scorer 'regex' needs expected\.pattern"):
        load_suite(path)


def test_duplicate_id_is_refused_with_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, [json.dumps(item(1)), json.dumps(item(2)), json.dumps(item(1))])
    with pytest.raises(ConfigError, match=r":3: duplicate id 't-0001' \(first used on line 1\)"):
        load_suite(path)


def test_unknown_packaged_suite_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"no packaged suite named 'nope' \(packaged: "):
        load_suite("nope")


def test_packaged_suites_load_by_name() -> None:
    names = available_suites()
    assert set(names) >= {"golden", "regression", "safety"}
    for name in names:
        suite = load_suite(name)
        assert suite.name == name and len(suite) > 0


def _items(counts: dict[str, int]) -> list[EvalItem]:
    out: list[EvalItem] = []
    for kind, count in counts.items():
        out += [EvalItem.model_validate(item(len(out), kind)) for _ in range(count)]
    return [i.model_copy(update={"id": f"t-{n}"}) for n, i in enumerate(out)]


def test_stratified_sample_is_proportional_with_one_of_each_kind() -> None:
    items = _items({"fact": 60, "format": 30, "safety": 9, "rare": 1})
    sample = stratified_sample(items, 20, seed=1)
    kinds = Counter(i.kind for i in sample)
    assert len(sample) == 20
    # exact shares 12, 6, 1.8, 0.2: the rare kind's floor of one is taken from safety's remainder
    assert kinds == {"fact": 12, "format": 6, "safety": 1, "rare": 1}
    assert [items.index(i) for i in sample] == sorted(items.index(i) for i in sample)


def test_stratified_sample_is_deterministic_per_seed() -> None:
    items = _items({"fact": 50, "format": 50})
    assert stratified_sample(items, 10, seed=3) == stratified_sample(items, 10, seed=3)
    assert stratified_sample(items, 10, seed=3) != stratified_sample(items, 10, seed=4)


def test_stratified_sample_larger_than_suite_returns_everything() -> None:
    items = _items({"fact": 3})
    assert stratified_sample(items, 10, seed=0) == items


def test_stratified_sample_smaller_than_kinds_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot hold one item of each of the 3 kinds"):
        stratified_sample(_items({"a": 5, "b": 5, "c": 5}), 2, seed=0)
