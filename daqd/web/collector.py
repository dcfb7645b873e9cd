"""`/metrics`: a prometheus_client collector that reads the counters daqd already keeps.

Nothing is counted per record for it: each scrape walks the receivers' and publishers'
`Counters` (the same numbers `daqctl status` shows) and builds the metric families then.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from daqd.runstate import State

if TYPE_CHECKING:
    from daqd.host import Host


class DaqdCollector(Collector):
    """Every metric of one daemon, read at scrape time."""

    def __init__(self, host: Host, http_counters: dict[str, int]) -> None:
        self.host = host
        self.http_counters = http_counters  # the web view's own refusals, by reason

    def describe(self) -> list[Metric]:
        return []  # families depend on the running configuration: nothing to pre-declare

    def collect(self) -> Iterator[Metric]:
        host = self.host
        kinds = ("component", "name")
        records = CounterMetricFamily(
            "daqd_records",
            "Records received (receivers) or delivered (publishers).",
            labels=kinds,
        )
        nbytes = CounterMetricFamily(
            "daqd_bytes", "Payload bytes received or delivered.", labels=kinds
        )
        dropped = CounterMetricFamily(
            "daqd_dropped",
            "Records (or input) lost, by named reason; reason=kernel: the kernel's UDP drops.",
            labels=(*kinds, "reason"),
        )
        errors = CounterMetricFamily(
            "daqd_errors", "Things that went wrong, by named reason.", labels=(*kinds, "reason")
        )
        up = GaugeMetricFamily(
            "daqd_receiver_up", "1 while a receiver is running, 0 otherwise.", labels=["name"]
        )
        for name, rec in host.receivers.items():
            c = rec.counters
            records.add_metric(("receiver", name), c.records)
            nbytes.add_metric(("receiver", name), c.bytes)
            for reason, n in c.drops.items():
                dropped.add_metric(("receiver", name, reason), n)
            for reason, n in c.errors.items():
                errors.add_metric(("receiver", name, reason), n)
            up.add_metric([name], 1 if rec.state == "running" else 0)
        offered = CounterMetricFamily(
            "daqd_publisher_offered", "Records offered to a publisher's queue.", labels=["name"]
        )
        depth = GaugeMetricFamily(
            "daqd_queue_depth", "Records waiting in a publisher's queue.", labels=["name"]
        )
        capacity = GaugeMetricFamily(
            "daqd_queue_capacity", "A publisher's queue_size.", labels=["name"]
        )
        for name, queue in host.queues.items():
            c = queue.publisher.counters
            records.add_metric(("publisher", name), c.records)
            nbytes.add_metric(("publisher", name), c.bytes)
            for reason, n in c.drops.items():
                dropped.add_metric(("publisher", name, reason), n)
            for reason, n in c.errors.items():
                errors.add_metric(("publisher", name, reason), n)
            offered.add_metric([name], queue.offered)
            depth.add_metric([name], queue.depth)
            capacity.add_metric([name], queue.size)
        yield from (records, nbytes, dropped, errors, up, offered, depth, capacity)
        yield from self._run_state()
        tap = CounterMetricFamily(
            "daqd_tap_dropped", "Records a slow live tap (daqctl tap, the page) could not take."
        )
        tap.add_metric([], host.tap_drops)
        yield tap
        refused = CounterMetricFamily(
            "daqd_http_refused",
            "Web requests refused (run control without a valid token, too many pages), by reason.",
            labels=["reason"],
        )
        for reason, n in self.http_counters.items():
            refused.add_metric([reason], n)
        yield refused

    def _run_state(self) -> Iterator[Metric]:
        host = self.host
        state = GaugeMetricFamily(
            "daqd_state", "The daemon's state: 1 for the current one.", labels=["state"]
        )
        for s in State:
            state.add_metric([s.name], 1 if host.state == s else 0)
        yield state
        uptime = GaugeMetricFamily("daqd_uptime_seconds", "Seconds since the daemon started.")
        uptime.add_metric([], _uptime(host))
        yield uptime
        started = GaugeMetricFamily(
            "daqd_start_time_seconds", "When the daemon started (Unix time)."
        )
        started.add_metric([], host.started_ns / 1e9)
        yield started
        run = host.run
        active = GaugeMetricFamily("daqd_run_active", "1 while a run is going on.")
        active.add_metric([], 1 if run is not None else 0)
        yield active
        if run is not None:
            info = GaugeMetricFamily(
                "daqd_run_info", "The current run (its id as a label).", labels=["run_id"]
            )
            info.add_metric([run.run_id], 1)
            yield info
            start = GaugeMetricFamily(
                "daqd_run_start_time_seconds", "When the current run started (Unix time)."
            )
            start.add_metric([], run.start_ns / 1e9)
            yield start
            if run.run_id.isdigit():
                number = GaugeMetricFamily(
                    "daqd_run_number", "The current run's id, where it is a number."
                )
                number.add_metric([], int(run.run_id))
                yield number
        last = host.last_run
        if last is not None:
            ended = GaugeMetricFamily(
                "daqd_last_run_info",
                "The last run that ended: its id and condition as labels.",
                labels=["run_id", "condition"],
            )
            ended.add_metric([last.run_id, last.condition.describe()], 1)
            yield ended


def _uptime(host: Host) -> float:
    return (time.time_ns() - host.started_ns) / 1e9


def make_registry(host: Host, http_counters: dict[str, int]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaqdCollector(host, http_counters))
    return registry
