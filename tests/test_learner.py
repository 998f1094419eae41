"""The learner's rules on its real SQLite store, and the rating simulation (scripts/bench_learner.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mirador.actors.learner import Learning, UnknownQuery

PLANS = ["quick", "quick+synthesis", "quick+deep+synthesis"]


def rate_many(learner, qtype, plan, ratings, start=0):
    for i, rating in enumerate(ratings, start):
        learner.observe(f"{qtype}-{plan}-{i}", qtype, plan)
        learner.rate(f"{qtype}-{plan}-{i}", rating)


def test_a_new_type_gets_the_routers_default(tmp_path):
    learner = Learning(str(tmp_path / "l.sqlite3"))
    choice = learner.choose("simple/general", PLANS, "quick")
    assert choice == {"plan": "quick", "learned": False, "evidence": {}}


def test_ratings_persist_and_change_the_plan_for_that_type_only(tmp_path):
    path = str(tmp_path / "l.sqlite3")
    learner = Learning(path)
    rate_many(learner, "medium/code", "quick+synthesis", [1, 2, 1])
    rate_many(learner, "medium/code", "quick+deep+synthesis", [5, 5, 4])
    reopened = Learning(path)  # as after a daemon restart
    choice = reopened.choose("medium/code", PLANS, "quick+synthesis")
    assert choice["plan"] == "quick+deep+synthesis" and choice["learned"] is True
    assert choice["evidence"]["quick+deep+synthesis"] == {"ratings": 3, "mean_rating": 4.67}
    assert reopened.choose("medium/travel", PLANS, "quick+synthesis")["plan"] == "quick+synthesis"
    (stats,) = reopened.stats()
    assert stats["type"] == "medium/code" and {p["plan"] for p in stats["plans"]} == {"quick+synthesis", "quick+deep+synthesis"}


def test_a_well_rated_default_is_kept_and_a_badly_rated_one_is_explored_away_from(tmp_path):
    learner = Learning(str(tmp_path / "l.sqlite3"))
    rate_many(learner, "simple/general", "quick", [5, 5, 4, 5, 5, 5, 4, 5, 5, 5])
    assert learner.choose("simple/general", PLANS, "quick")["plan"] == "quick"
    rate_many(learner, "simple/code", "quick", [1, 2])
    assert learner.choose("simple/code", PLANS, "quick")["plan"] != "quick"


def test_unknown_ids_reset_and_rerating(tmp_path):
    learner = Learning(str(tmp_path / "l.sqlite3"))
    with pytest.raises(UnknownQuery):
        learner.rate("never-answered", 3)
    learner.observe("q1", "simple/general", "quick+synthesis")
    assert learner.last_query() == "q1"
    learner.rate("q1", 1)
    learner.rate("q1", 5)  # changing one's mind replaces the rating
    assert learner.stats()[0]["plans"] == [{"plan": "quick+synthesis", "ratings": 1, "mean_rating": 5.0}]
    assert learner.reset() == 1
    assert learner.stats() == [] and learner.last_query() is None
    assert learner.choose("simple/general", PLANS, "quick")["plan"] == "quick"


def test_simulated_user_the_learner_finds_the_best_plan(tmp_path):
    out = tmp_path / "learner.json"
    subprocess.run([sys.executable, "scripts/bench_learner.py", "--seeds", "6", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["best_pick_share"] >= 0.8  # the benchmark's target is 0.9 over 20 seeds
    curve = result["regret_curve"]
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 / 2  # regret falls as ratings come in
