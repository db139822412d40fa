"""Prometheus text exposition (format 0.0.4) of the service's counters, written by hand: four metric
families do not justify a client library, and the service stays within its [serve] extra.

    leader_edge_requests_total{route,code}          every answered request
    leader_edge_request_errors_total{route,code}    the 4xx and 5xx among them
    leader_edge_request_duration_seconds{route}     histogram, request received -> response ready
    leader_edge_patients_total                      patients scored
    leader_edge_batch_patients                      histogram of patients per model call (micro-batches)
    leader_edge_model_info{bundle_id,variant,threshold}  1 for the bundle serving now
    leader_edge_model_swaps_total{result}           bundle swaps done / refused

Updated from the event loop only (one thread), so plain ints suffice.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

# Seconds. A single patient takes ~1 ms in-process on the 2-core VM; the buckets resolve 0.5 ms
# there and reach 5 s for a full batch on a loaded machine.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    def __init__(self, buckets: tuple) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bucket (+Inf only)
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, total = [], 0
        for bound, count in zip(self.buckets, self.counts):
            total += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {total}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.n}"]
        return out


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The service's counters; `text()` is the /metrics body."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batch = Histogram(BATCH_BUCKETS)
        self.patients = 0
        self.swaps: dict[str, int] = defaultdict(int)
        self.model: dict = {}

    def request(self, route: str, code: int, seconds: float) -> None:
        self.requests[(route, code)] += 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = Histogram(LATENCY_BUCKETS)
        hist.observe(seconds)

    def text(self) -> str:
        out = ["# HELP leader_edge_requests_total Requests answered, by route and status code.",
               "# TYPE leader_edge_requests_total counter"]
        out += [f'leader_edge_requests_total{{route="{_label(r)}",code="{c}"}} {n}' for (r, c), n in sorted(self.requests.items())]
        out += ["# HELP leader_edge_request_errors_total Requests answered with a 4xx or 5xx status.",
                "# TYPE leader_edge_request_errors_total counter"]
        out += [f'leader_edge_request_errors_total{{route="{_label(r)}",code="{c}"}} {n}'
                for (r, c), n in sorted(self.requests.items()) if c >= 400]
        out += ["# HELP leader_edge_request_duration_seconds Time from request to response, by route.",
                "# TYPE leader_edge_request_duration_seconds histogram"]
        for route, hist in sorted(self.latency.items()):
            out += hist.lines("leader_edge_request_duration_seconds", f'route="{_label(route)}"')
        out += ["# HELP leader_edge_patients_total Patients scored.", "# TYPE leader_edge_patients_total counter",
                f"leader_edge_patients_total {self.patients}",
                "# HELP leader_edge_batch_patients Patients per model call (concurrent requests are scored together).",
                "# TYPE leader_edge_batch_patients histogram", *self.batch.lines("leader_edge_batch_patients", ""),
                "# HELP leader_edge_model_info The bundle serving now (its id is the manifest digest's first 16 hex digits).",
                "# TYPE leader_edge_model_info gauge"]
        if self.model:
            labels = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(self.model.items()))
            out.append(f"leader_edge_model_info{{{labels}}} 1")
        out += ["# HELP leader_edge_model_swaps_total Bundle swaps, done or refused (the old bundle kept serving).",
                "# TYPE leader_edge_model_swaps_total counter"]
        out += [f'leader_edge_model_swaps_total{{result="{k}"}} {n}' for k, n in sorted(self.swaps.items())]
        return "\n".join(out) + "\n"
