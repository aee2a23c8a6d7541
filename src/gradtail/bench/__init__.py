"""The benchmark harness: suites of (method x seed) runs -> results.json + report (``gradtail bench``)."""

from gradtail.bench.runner import plan_runs, run_suite
from gradtail.bench.suite import MethodSpec, Suite, load_suite

__all__ = ["MethodSpec", "Suite", "load_suite", "plan_runs", "run_suite"]
