"""GBG grouping memory at ImageNet scale: 1000 classes, a ResNet-50-sized shared-parameter vector.

docs/methods/gbg.md §1: full-dimensional prototypes are C x |theta_s| floats (about 94 GB for ResNet-50 on
1000 classes). gradtail accumulates per-class gradients in place and sketches them to k dimensions
(:class:`gradtail.optim.grouping.PrototypeAccumulator` + :class:`CountSketch`), then clusters.

This benchmark feeds that exact accumulator synthetic per-class gradients of ResNet-50's backbone size
(|theta_s| counted from torchvision's ``resnet50`` built on the meta device, fc excluded): class c's
gradient, summed over ``--batches`` batches, is ``u_{c mod 4} + noise * v_c`` with u, v cheap rolls of
one random base vector (near-orthogonal directions), so the right grouping is known (c mod 4). It runs
in a child process and reports that process's peak resident memory (``ru_maxrss``), its resident
memory before grouping (torch + the synthetic source), and the grouping's own share (the difference),
plus the time and whether spectral clustering recovered the 4 planted groups.

    python benchmarks/grouping_memory.py --output runs/bench/grouping_memory.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from typing import Any

import torch
from bench_output import write_result

from gradtail.environment import environment_info


def resnet50_backbone_size() -> int:
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50()
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("fc."))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(args: dict[str, Any], queue: Any) -> None:
    from gradtail.optim.grouping import PrototypeAccumulator, create_sketch, spectral_groups

    torch.set_num_threads(args["threads"])
    dim, classes, k = args["dim"], args["classes"], args["sketch_dim"]
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(dim, generator=gen)
    work = torch.empty(dim)
    rss_before = _rss_mib()
    start = time.perf_counter()
    sketch = create_sketch(args["sketch"], dim, k, seed=0)
    acc = PrototypeAccumulator(classes, dim, sketch, class_block=args["class_block"])
    for c in range(classes):
        for b in range(args["batches"]):  # gradient sums of the class's batches, accumulated in place
            work.copy_(torch.roll(base, shifts=1_000_003 * (c % 4) + 1))
            work.add_(torch.roll(base, shifts=7919 * (c * args["batches"] + b) + 17), alpha=args["noise"])
            acc.add(c, work)
        acc.end_class(c, args["batches"])
    prototypes = acc.result()
    accumulate_s = time.perf_counter() - start
    start = time.perf_counter()
    groups = spectral_groups(prototypes, 4, seed=0)
    cluster_s = time.perf_counter() - start
    planted = torch.arange(classes) % 4
    # recovered up to a relabelling: every group is exactly one planted class
    pairs = {(int(g), int(p)) for g, p in zip(groups, planted, strict=True)}
    recovered = len(pairs) == 4 and len({g for g, _ in pairs}) == 4
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(
        {
            "rss_before_grouping_mib": round(rss_before, 1),
            "peak_rss_mib": round(peak, 1),
            "grouping_peak_mib": round(peak - rss_before, 1),
            "accumulate_and_sketch_seconds": round(accumulate_s, 1),
            "spectral_clustering_seconds": round(cluster_s, 2),
            "planted_groups_recovered": recovered,
            "group_sizes": torch.bincount(groups).tolist(),
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dim", type=int, default=None, help="default: ResNet-50's backbone parameter count")
    p.add_argument("--sketch", default="count", choices=["count", "gaussian"])
    p.add_argument("--sketch-dim", type=int, default=1024)
    p.add_argument("--class-block", type=int, default=8)
    p.add_argument("--batches", type=int, default=2, help="gradient sums accumulated per class")
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--limit-mib", type=float, default=2048.0, help="the goal for grouping_peak_mib")
    p.add_argument("--output", default="runs/bench/grouping_memory.json")
    a = p.parse_args()
    dim = a.dim or resnet50_backbone_size()
    args = {
        "dim": dim, "classes": a.classes, "sketch": a.sketch, "sketch_dim": a.sketch_dim,
        "class_block": a.class_block, "batches": a.batches, "noise": a.noise, "threads": a.threads,
    }  # fmt: skip
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(args, queue))
    proc.start()
    measured = queue.get()
    proc.join()
    full_gib = a.classes * dim * 4 / 2**30
    result = {
        "benchmark": "grouping_memory",
        "setup": args,
        "full_prototypes_gib": round(full_gib, 1),
        "sketched_prototypes_mib": round(a.classes * a.sketch_dim * 4 / 2**20, 1),
        **measured,
        "limit_mib": a.limit_mib,
        "within_limit": measured["grouping_peak_mib"] < a.limit_mib,
        "environment": environment_info(torch.device("cpu")),
    }
    write_result(result, a.output)


if __name__ == "__main__":
    main()
