"""Concurrent runs of one stage into one place (issue 14): the stage claim is exclusive where the store
allows it, a lost race is detected where it does not, and two training runs of one name never share an
MLflow run silently.

The racers are real processes (``spawn``) released together by a barrier, on a local disk and on the
moto S3 server (which honours ``IfNoneMatch``), and through a loopback proxy that drops
``If-None-Match`` (a store without create-if-absent).
"""
from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from workflows import fingerprint as F
from workflows import storage

ROUNDS = 6


def _fp(steps: int = 4) -> F.Fingerprint:
    return F.Fingerprint("train proxy", {"train.steps": steps}, {}, "/x/proxy.pt")


def _racer(places: list[str], barrier, results, then_record: bool) -> None:
    """One run: as soon as the barrier lets both go, decide and claim each place (as the stages do);
    optionally publish its record once both have claimed."""
    for place in places:
        barrier.wait(timeout=60)
        try:
            action = F.decide("train proxy", _fp(), place).action
            claim = F.write_claim(place, _fp(), ray_run="tiny-proxy")
            out = "claimed"
        except F.ConcurrentRunError:
            claim, out = None, "lost at claim"
        if then_record:
            barrier.wait(timeout=60)  # both claims are written before either records
            if claim is not None:
                try:
                    F.update_record(place, {"fingerprint": _fp().to_json(), "pid": os.getpid()}, claim)
                    out = "recorded"
                except F.ConcurrentRunError:
                    out = "lost at record"
        results.put((place, os.getpid(), f"{action}: {out}"))


def race(places: list[str], then_record: bool = False) -> dict[str, list[str]]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(places, barrier, results, then_record)) for _ in range(2)]
    for p in procs:
        p.start()
    got: dict[str, list[str]] = {}
    for _ in range(2 * len(places)):
        place, _pid, out = results.get(timeout=120)
        got.setdefault(place, []).append(out)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return {k: sorted(v) for k, v in got.items()}


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return f"s3://{request.getfixturevalue('s3_bucket')}/root"


def test_two_concurrent_claims_exactly_one_wins(root):
    """Create-if-absent: when both runs found the place empty, one claims it and the other is refused
    at once; when the slower one already saw the first one's claim (it takes it for an interrupted run
    to resume), the first is refused when it records. Either way exactly one run records."""
    places = [storage.join(root, f"train/r{i}") for i in range(ROUNDS)]
    got = race(places, then_record=True)
    both_empty = 0
    for p in places:
        outs = got[p]
        assert [o.split(": ")[1] for o in outs].count("recorded") == 1, got
        winner = F.read_claim(p)
        assert winner["fingerprint"]["hash"] == _fp().hash
        if outs[0].startswith("run") and outs[1].startswith("run"):  # both saw nothing: the create decides
            both_empty += 1
            assert sorted(o.split(": ")[1] for o in outs) == ["lost at claim", "recorded"], got
            assert winner["claim_id"] == winner["owner"]["token"]  # the creator's claim, untouched
    assert both_empty >= ROUNDS // 2, f"the racers rarely met: {got}"


@pytest.mark.s3
def test_a_store_without_create_if_absent_still_has_one_winner(s3_server, s3_bucket, monkeypatch):
    """The store accepts both creates: the read-back or the check before the record finds the one
    whose claim was overwritten; exactly one run publishes its record."""
    from test_storage import FaultyS3Proxy

    proxy = FaultyS3Proxy(s3_server, fraction=0.0)
    proxy.ignore_if_none_match = True
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # inherited by the spawned racers
    try:
        places = [f"s3://{s3_bucket}/root/train/r{i}" for i in range(ROUNDS)]
        got = race(places, then_record=True)
        for p in places:
            outs = [o.split(": ")[1] for o in got[p]]
            assert outs.count("recorded") == 1 and set(outs) <= {"recorded", "lost at claim", "lost at record"}, got
            rec = storage.read_done(p)
            assert rec["pid"] and F.read_claim(p)["owner"]["pid"] == rec["pid"]  # the claim holder's record
    finally:
        proxy.close()


def test_resume_keeps_the_claim_id_and_a_takeover_is_detected(tmp_path):
    place = str(tmp_path / "train")
    first = F.write_claim(place, _fp())
    again = F.write_claim(place, _fp())  # a resume of the same work: same claim id, new owner
    assert again["claim_id"] == first["claim_id"] and again["owner"]["token"] != first["owner"]["token"]
    with pytest.raises(F.ConcurrentRunError, match="taken over"):
        F.update_record(place, {"x": 1}, first)  # the first owner no longer holds it
    F.update_record(place, {"x": 1}, again)
    assert storage.read_done(place)["x"] == 1
    fresh = F.write_claim(place, _fp(steps=8))  # --force with other settings: a new claim id
    assert fresh["claim_id"] != first["claim_id"]


def test_two_runs_of_one_name_never_share_an_mlflow_run(tmp_path):
    """On one tracking store, a run with the default name must not reopen another claim's RUNNING run
    (it used to: any unfinished run with the same name); a resume of the same claim does reopen it."""
    from workflows.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    a = Tracker(uri, "evatok", "tiny-proxy", system_metrics=False, tags={"evatok.claim": "claim-a"})
    run_a = a.start()
    assert run_a
    import mlflow

    mlflow.end_run(status="KILLED")  # an interrupted run (not FINISHED): what a resume looks for
    b = Tracker(uri, "evatok", "tiny-proxy", system_metrics=False, tags={"evatok.claim": "claim-b"})
    run_b = b.start()
    assert run_b and run_b != run_a
    b.end()
    a2 = Tracker(uri, "evatok", "tiny-proxy", system_metrics=False, tags={"evatok.claim": "claim-a"})
    assert a2.start() == run_a
    a2.end()
