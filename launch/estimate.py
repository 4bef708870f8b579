"""What a SageMaker job will cost, before it runs: from a finished pilot.

    master-poc-launch --estimate-from PILOT_OUTPUT --cases 1-3000 \\
        --instance-type ml.m5.2xlarge --instance-count 6 [--use-spot] [--target-hours 2]

The pilot (any finished output, local or s3://, made by the same code on
representative cases) gives, from its markers, the seconds one worker
process spends per case (the span between its first and last commit over
the cases in it, so Beam's overhead between the steps is in it), and from
its metadata the leader's finalize per case. For the requested job:

    stage 1 per host   ceil(cases / hosts) x seconds per case / (vCPUs x efficiency)
    finalize           (stage 2 shard writing + verification) per case x cases + metadata and report
    wall time          start-up + stage 1 per host + finalize (the hosts run in parallel)
    cost               hosts x wall time x price per hour (on demand; spot x the spot factor)

vCPUs and prices come from a dated table shipped in the package
(launch/prices.json; --price-per-hour overrides the price). Worker scaling:
2 worker processes measured 1.95x one on a 2-core machine (the benchmark);
more workers on more vCPUs were not measured, so each doubling of the
workers is assumed to keep the same 0.975 of the rate per worker (8 vCPUs:
7.4x): --worker-efficiency changes it.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from typing import Optional

PRICES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prices.json")
WORKER_EFFICIENCY = 0.975  # 2 workers measured 1.95x one (tests/benchmarks/bench.py, 2-core machine)
STARTUP_S = 180.0  # instance start, image pull (1.06 GB of layers) and the stage's start-up, assumed


class EstimateError(ValueError):
    pass


def price_table() -> dict:
    with open(PRICES) as fh:
        return json.load(fh)


@dataclass(frozen=True)
class Pilot:
    """What a finished output says a case costs."""

    cases: int
    seconds_per_case: float  # one worker process, steady state
    finalize_per_case: float  # the leader: stage 2 shard writing + verification, per case
    finalize_fixed_s: float  # the leader: metadata, schema and report (charts), per run
    windows_per_case: float
    mb_per_case: float  # compressed examples


def read_pilot(output: str) -> Pilot:
    from pipeline.output import names, storage
    if not storage.exists(storage.metadata_path(output)):
        raise EstimateError(f"{output} has no {names.METADATA_NAME}: not a finished output")
    meta = storage.read_json(storage.metadata_path(output))
    done = storage.read_done(output)
    if len(done) < 2:
        raise EstimateError(f"{output} has {len(done)} committed case(s): a pilot needs at least 2")
    by_worker: dict = {}
    for m in done.values():
        by_worker.setdefault((m.host, m.worker), []).append(m.committed)
    spans = [(max(t) - min(t)) / (len(t) - 1) for t in by_worker.values() if len(t) >= 2 and max(t) > min(t)]
    if spans:
        per_case = statistics.median(spans)
    else:  # one case per worker: the steps timed inside the DoFns
        per_case = statistics.mean(sum(v for k, v in m.timings.items() if k != "parse") for m in done.values())
    t = meta.get("timings") or {}
    moved = t.get("stage2_shard_write_s", 0.0) + t.get("verify_s", 0.0)
    with_windows = [m for m in done.values() if m.windows]
    return Pilot(cases=len(done), seconds_per_case=per_case, finalize_per_case=moved / len(done),
                 finalize_fixed_s=t.get("metadata_report_s", 0.0),
                 windows_per_case=sum(m.windows for m in done.values()) / len(done),
                 mb_per_case=sum(m.object_bytes for m in with_windows) / 1e6 / len(done))


def speedup(workers: int, efficiency: float = WORKER_EFFICIENCY) -> float:
    """Throughput of `workers` worker processes in units of one: each doubling
    keeps `efficiency` of the rate per worker (2 workers: 1.95 measured)."""
    return workers * efficiency ** math.log2(workers) if workers > 1 else 1.0


@dataclass(frozen=True)
class Estimate:
    cases: int
    hosts: int
    instance_type: str
    vcpus: int
    price_per_hour: float
    spot_factor: float
    stage1_s: float  # per host
    finalize_s: float
    startup_s: float

    @property
    def wall_s(self) -> float:
        return self.startup_s + self.stage1_s + self.finalize_s

    @property
    def on_demand(self) -> float:
        return self.hosts * self.wall_s / 3600 * self.price_per_hour

    @property
    def spot(self) -> float:
        return self.on_demand * self.spot_factor


def estimate(pilot: Pilot, cases: int, hosts: int, instance_type: str, price_per_hour: Optional[float] = None,
             efficiency: float = WORKER_EFFICIENCY, startup_s: float = STARTUP_S,
             table: Optional[dict] = None, vcpus: Optional[int] = None) -> Estimate:
    table = table or price_table()
    kind = table["types"].get(instance_type) or {}
    if not kind and (price_per_hour is None or vcpus is None):
        raise EstimateError(f"{instance_type} is not in the price table ({', '.join(table['types'])}); "
                            "give its --price-per-hour and --vcpus, or a type of the table")
    vcpus = vcpus or kind["vcpus"]
    per_host = math.ceil(cases / hosts)
    stage1 = per_host * pilot.seconds_per_case / speedup(vcpus, efficiency)
    return Estimate(cases, hosts, instance_type, vcpus,
                    price_per_hour if price_per_hour is not None else kind["on_demand"], table["spot_factor"],
                    stage1, pilot.finalize_fixed_s + pilot.finalize_per_case * cases, startup_s)


def suggest_hosts(pilot: Pilot, cases: int, instance_type: str, target_s: float, **kw) -> Optional[Estimate]:
    """The fewest hosts whose wall time is within `target_s` (None if no count up to the cases does it)."""
    for hosts in range(1, cases + 1):
        e = estimate(pilot, cases, hosts, instance_type, **kw)
        if e.wall_s <= target_s:
            return e
        if e.stage1_s <= 0:
            break
    return None


def _h(seconds: float) -> str:
    h, m = divmod(int(round(seconds / 60)), 60)
    return f"{h} h {m:02d} min" if h else f"{m} min"


def report(pilot: Pilot, e: Estimate, spot: bool, table: dict, suggestion: Optional[Estimate] = None,
           target_s: Optional[float] = None) -> list[str]:
    lines = [
        f"pilot: {pilot.cases} cases, {pilot.seconds_per_case:.2f} s per case per worker process, "
        f"{pilot.windows_per_case:.0f} windows and {pilot.mb_per_case:.2f} MB per case; "
        f"finalize {pilot.finalize_per_case * 1000:.1f} ms per case + {pilot.finalize_fixed_s:.1f} s",
        f"job: {e.cases} cases on {e.hosts} x {e.instance_type} ({e.vcpus} vCPUs, one worker each)",
        f"  stage 1 per host   {_h(e.stage1_s)} ({math.ceil(e.cases / e.hosts)} cases)",
        f"  leader's finalize  {_h(e.finalize_s)}",
        f"  start-up           {_h(e.startup_s)} (assumed: instance, image pull, stage start)",
        f"  wall time          {_h(e.wall_s)}",
        f"  cost on demand     ${e.on_demand:,.2f} ({e.hosts} x {_h(e.wall_s)} x ${e.price_per_hour:.3f}/h)",
        f"  cost on spot       ${e.spot:,.2f} (spot at {e.spot_factor:.0%} of on demand, assumed)"
        + ("  <- this launch" if spot else ""),
        f"prices: {table['region']}, {table['as_of']} ({table['source']}); check them before a large run",
    ]
    if target_s is not None:
        lines.append(f"for a wall time within {_h(target_s)}: "
                     + (f"{suggestion.hosts} x {suggestion.instance_type} ({_h(suggestion.wall_s)}, "
                        f"${suggestion.on_demand:,.2f} on demand, ${suggestion.spot:,.2f} on spot)"
                        if suggestion else "not reachable with this type (the leader's finalize alone is longer)"))
    return lines
