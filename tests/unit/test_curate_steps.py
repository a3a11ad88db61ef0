"""Vote, gold checks, judge, balance and test-set choice as plain Python."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from ray_pipeline.config import (
    BuildTestSetSection,
    GoldSection,
    JudgeSection,
    TaskSection,
    VoteSection,
)
from ray_pipeline.curate.balance import balance_draw, cap_rows, keep_shares, quotas, resample
from ray_pipeline.curate.gold import GoldCheck
from ray_pipeline.curate.holdout import (
    candidate_bounds,
    choose,
    read_frozen,
    write_test_sets,
)
from ray_pipeline.curate.judge import (
    cutoff,
    from_replies,
    judge_prompt,
    keep_judged,
    parse_judgement,
    to_requests,
)
from ray_pipeline.curate.vote import Review, Vote, majority, merge_votes
from ray_pipeline.data.schema import FAILED, FILTERED, OK, dumps, new_row

TASK = TaskSection(prompt={"template": "{input}"}, label_key="toxic", labels=["0", "1"])


def row(text="t", label="1", line=0, source="s", votes=None, **kw):
    return new_row(
        id=f"{source}-{text}-{line}",
        source=source,
        source_line=line,
        input=text,
        response=f'{{"toxic": {label}}}',
        output=f'{{"toxic": {label}}}',
        label=label,
        teacher=kw.pop("teacher", "main"),
        votes=dumps(votes) if votes is not None else None,
        **kw,
    )


def votes(*labels):
    return [
        {"teacher": f"t{i}", "sample": 0, "response": "x", "label": lab}
        for i, lab in enumerate(labels)
    ]


def scores(r):
    return json.loads(r["scores"])


# ----------------------------------------------------------------------------------- vote
def test_majority_ties_go_to_the_main_label_then_label_order():
    assert majority(Counter({"0": 2, "1": 1}), "1", ["0", "1"]) == "0"
    assert majority(Counter({"0": 1, "1": 1}), "1", ["0", "1"]) == "1"
    assert majority(Counter({"0": 1, "1": 1}), None, ["0", "1"]) == "0"


def test_vote_relabels_and_records_agreement():
    rows = Vote(TASK)(
        [
            row("a", "1", votes=votes("1", "0", "0")),
            row("b", "1", votes=votes("1", "1", None)),  # an unparsable vote does not count
            row("c", "0"),  # no votes: its own answer
            row("d", "1", votes=votes("1"), status=FILTERED),
        ]
    )
    a, b, c, d = rows
    assert a["label"] == "0" and a["output"] == '{"toxic": 0}'
    assert scores(a)["vote"] == {
        "label": "0",
        "agreement": 0.6667,
        "counts": {"1": 1, "0": 2},
        "relabeled_from": "1",
    }
    assert scores(b)["vote"]["agreement"] == 1.0 and b["label"] == "1"
    assert scores(c)["vote"] == {"label": "0", "agreement": 1.0, "counts": {"0": 1}}
    assert d["scores"] is None


def test_review_takes_low_agreement_rows_without_gold():
    rows = Vote(TASK)(
        [
            row("a", votes=votes("1", "0", "0")),
            row("b", votes=votes("1", "0", "0"), gold="0"),
            row("c", votes=votes("1", "1", "1")),
        ]
    )
    rows = Review(VoteSection(enabled=True, min_agreement=0.7), TASK)(rows)
    assert rows[0]["reason"] == "low_agreement: 0.67 < 0.7 (0: 2, 1: 1)"
    assert rows[1]["status"] == OK and rows[2]["status"] == OK


def test_merge_votes_gathers_the_answers_of_one_input():
    rows = merge_votes(
        [
            row("Same  text", "1", line=2, source="b", teacher="t2"),
            row("same text", "0", line=1, source="a", teacher="t1", votes=votes("0", "0")),
            row("other", "1", line=3, source="a"),
        ]
    )
    carrier = rows[1]
    assert [v["label"] for v in json.loads(carrier["votes"])] == ["0", "0", "1"]
    assert rows[0]["reason"] == f"vote_merged: its answers count in the vote of row {carrier['id']}"
    assert rows[2]["votes"] is None and rows[2]["status"] == OK


# ----------------------------------------------------------------------------------- gold
@pytest.mark.parametrize(
    "policy, status, label", [("keep", OK, "1"), ("drop", FILTERED, "1"), ("relabel", OK, "0")]
)
def test_gold_disagreement_policies(policy, status, label):
    r = GoldCheck(GoldSection(on_disagreement=policy), TASK)([row("a", "1", gold="0")])[0]
    assert r["status"] == status and r["label"] == label
    entry = scores(r)["gold"]
    assert entry["gold"] == "0" and entry["label"] == "1"
    if policy == "drop":
        assert r["reason"] == "gold_disagreement: the teacher says 1, gold is 0"
    if policy == "relabel":
        assert r["output"] == '{"toxic": 0}' and entry["relabeled_from"] == "1"


def test_gold_rows_mixed_in_are_not_teacher_answers():
    mixed = row("a", "1", gold="1", teacher="gold:is_bad")
    voted = row("b", "1", gold="1", votes=votes("1", "0"))
    r1, r2, r3 = GoldCheck(GoldSection(), TASK)([mixed, voted, row("c", "1")])
    assert scores(r1)["gold"] == {"gold": "1", "mixed": True}
    assert scores(r2)["gold"]["teachers"] == [["t0", "1"], ["t1", "0"]]
    assert r3["scores"] is None  # no gold label


# ---------------------------------------------------------------------------------- judge
def test_judge_prompt_fills_in_one_pass():
    assert judge_prompt("I: {input} A: {answer}", "say {answer}", "x") == "I: say {answer} A: x"


def test_parse_judgement():
    assert parse_judgement('```json\n{"score": 4, "reason": "ok"}\n```') == (4, "ok")
    assert parse_judgement('{"score": "5"}') == (5, "")
    for bad, msg in [
        ("nothing", "no JSON"),
        ('{"s": 1}', "no 'score'"),
        ('{"score": 9}', "1 to 5"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_judgement(bad)


def test_judge_request_rows_carry_the_row_and_get_it_back():
    original = row("a comment", "1", scores=dumps({"vote": {"agreement": 1.0}}))
    skipped = row("b", status=FILTERED, reason="too_short: 1")
    requests = to_requests([original, skipped], "Rate {input} / {answer}", "canonical")
    req = requests[0]
    assert req["response"] is None and req["status"] == OK and req["id"] == original["id"]
    assert json.loads(req["messages"]) == [
        {"role": "user", "content": 'Rate a comment / {"toxic": 1}'}
    ]
    assert requests[1] is skipped
    # What the teacher's actor pool does to a request row: its answer, cost and model.
    answered = dict(req, response='{"score": 2, "reason": "wrong"}', teacher="judge-m", cost=0.01)
    failed = dict(req, status=FAILED, reason="teacher_error: 500 after 5 attempts")
    budget = dict(req, status=FAILED, reason="budget_exhausted: spent")
    out = from_replies([answered, skipped, failed, budget])
    assert {k: out[0][k] for k in ("id", "label", "response")} == {
        k: original[k] for k in ("id", "label", "response")
    }
    assert scores(out[0]) == {
        "vote": {"agreement": 1.0},
        "judge": {"score": 2, "reason": "wrong", "model": "judge-m", "cost": 0.01, "cached": False},
    }
    assert out[1] is skipped
    assert (
        out[2]["status"] == FAILED
        and out[2]["reason"] == "judge_error: teacher_error: 500 after 5 attempts"
    )
    assert out[3]["reason"] == "budget_exhausted: spent"


def test_cutoff_keeps_the_top_share_thinning_the_boundary_score():
    counts = {5: 10, 4: 20, 3: 30, 1: 40}
    assert cutoff(counts, JudgeSection(keep_top=0.3)) == (4, 1.0)
    assert cutoff(counts, JudgeSection(keep_top=0.2)) == (4, 0.5)
    assert cutoff(counts, JudgeSection(min_score=3.5)) == (4, 1.0)
    assert cutoff(counts, JudgeSection()) == (1, 1.0)


def test_keep_judged_drops_under_the_cut():
    def judged(i, score):
        return row(f"r{i}", scores=dumps({"judge": {"score": score}}))

    rows = [judged(i, 4) for i in range(400)] + [judged(400, 2)]
    out = keep_judged(rows, 4, 0.5, JudgeSection(keep_top=0.5), seed=0)
    kept = sum(r["status"] == OK for r in out)
    assert 160 < kept < 240  # half the ties, by a hash draw
    assert out[-1]["reason"] == "judge_low: score 2 below the top 50%"


# -------------------------------------------------------------------------------- balance
def test_cap_rows_keeps_at_most_cap_per_user():
    rows = [row(f"t{i}", user="power", line=i) for i in range(10)] + [row("x", user="quiet")]
    rows.append(row("y"))  # no user: not capped
    out = cap_rows(rows, "user", 3, seed=0)
    assert sum(r["status"] == OK for r in out[:10]) == 3
    assert out[10]["status"] == OK and out[11]["status"] == OK
    dropped = [r["reason"] for r in out if r["status"] == FILTERED]
    assert dropped == ["over_cap: user 'power' has 10 rows > cap 3"] * 7
    assert [r["status"] for r in cap_rows(rows, "user", 3, seed=0)] == [r["status"] for r in out]


def test_keep_shares_reach_the_target_with_most_rows():
    assert keep_shares({"0": 900, "1": 100}, {"0": 0.5, "1": 0.5}) == {"0": 100 / 900, "1": 1.0}
    assert keep_shares({"0": 900, "1": 100}, {"0": 0.8, "1": 0.2}) == {"0": 400 / 900, "1": 1.0}
    assert keep_shares({"0": 10, "1": 0}, {"0": 0.5, "1": 0.5}) == {"0": 1.0, "1": 0.0}


def test_quotas_and_resample_by_a_cut_of_the_draws():
    assert quotas({"0": 900, "1": 100}, {"0": 0.5, "1": 0.5}) == {"0": 100, "1": 100}
    rows = [row(f"t{i}", "0", line=i) for i in range(10)] + [row("one", "1")]
    draws = sorted(balance_draw(r, 2) for r in rows[:10])
    out = resample(rows, {"0": draws[3], "1": 1.0}, {"0": 0.5, "1": 0.5}, seed=2)
    assert sum(r["status"] == OK for r in out[:10]) == 4 and out[10]["status"] == OK
    dropped = {r["reason"] for r in out if r["status"] == FILTERED}
    assert dropped == {"rebalanced: label 0 over its target share of 0.5"}
    assert all(r["status"] == FILTERED for r in resample(rows[:3], {"0": -1.0}, {"0": 0}, 2))


# ------------------------------------------------------------------------------ test sets
def test_choose_takes_the_smallest_draws_per_label():
    spec = BuildTestSetSection(name="bal", kind="balanced", rows=4)
    counts = {"0": 50, "1": 3}
    cands = [{"order": i, "gold": "0", "u": i / 100} for i in range(10)]
    cands += [{"order": 100 + i, "gold": "1", "u": 0.5 + i / 100} for i in range(3)]
    chosen = choose(cands, spec, ["0", "1"], counts)
    assert [c["order"] for c in chosen] == [0, 1, 100, 101]
    assert choose(cands[:1] + cands[10:], spec, ["0", "1"], counts) is None  # too few: widen
    # About twice what is needed, padded: a big label draws a small share of its rows.
    bounds = candidate_bounds(spec, ["0", "1"], {"0": 5000, "1": 3})
    assert bounds == {"0": (2 * 2 + 64) / 5000, "1": 1.0}
    with pytest.raises(ValueError, match="wants 2 rows of gold label 1, only 1 are left"):
        choose(cands, spec, ["0", "1"], {"0": 50, "1": 1})


def test_frozen_test_sets_refuse_a_changed_file(tmp_path):
    rows = [
        {"id": f"r{i}", "source": "s", "source_line": i, "input": f"text {i}", "gold": "0"}
        for i in range(3)
    ]
    frozen = write_test_sets({"indist": rows}, {"indist": "in_distribution"}, tmp_path)
    assert frozen["test_sets"][0]["rows"] == 3
    sets = read_frozen(tmp_path / "frozen.json")
    assert sets[0]["path"] == str(tmp_path / "indist.jsonl")
    with (tmp_path / "indist.jsonl").open("a") as f:
        f.write('{"input": "sneaked in", "label": "1"}\n')
    with pytest.raises(ValueError, match="test set 'indist' .* changed since it was frozen"):
        read_frozen(tmp_path / "frozen.json")
