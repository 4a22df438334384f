"""The latency merge policy against "macs" on the zoo, and the latency table against measured latency.

For each model (random weights, random batch-norm statistics) and each set of linearized sites (all of them,
and a seeded random half): linearize + merge under "macs" and under "latency" (an eager CPU table at batch 1),
then both deploy forms measured side by side, interleaved (``tlc.compare``): the ratio macs/latency with its
interquartile range (above 1: the latency plan is faster). Then the table's predicted latency of each
latency deploy form and of the batch-norm-folded original (``LatencyTable.predict``) against its measured
latency, for eager and ONNX Runtime at batch 1 and 32: the relative error of the prediction, and of the deploy form's
prediction anchored on the measured original (``predict(..., reference=(original, its latency))``).

    python benchmarks/latency_policy.py --threads 1

Resumable: each finished row is kept in ``benchmarks/results/latency-policy.json`` and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import RESULTS, machine  # noqa: E402
from merge_zoo import build, randomize_bn  # noqa: E402

import tlc  # noqa: E402
from tlc.measure import LatencyTable, count_macs, depth  # noqa: E402
from tlc.measure.latency import measure_latency, rebatch  # noqa: E402

MODELS = ["tlc:cifar_resnet18", "tlc:cifar_mobilenet_v2", "tlc:cifar_vgg16_bn", "torchvision:resnet18",
          "torchvision:resnet50", "torchvision:mobilenet_v2", "torchvision:swin_t", "hf:bert-tiny"]
PATH = RESULTS / "latency-policy.json"


def site_sets(model: torch.nn.Module, x: object) -> dict[str, list[str]]:
    sites = [s.name for s in tlc.find_sites(model, x)]
    half = sorted(random.Random(0).sample(sites, len(sites) // 2))
    return {"all": sites, "half": half}


def policy_row(spec: str, which: str, sites: list[str], model: torch.nn.Module, x: object,
               table: LatencyTable) -> dict:
    """Both policies' deploy forms of one site set, measured side by side (eager, batch 1)."""
    one = rebatch(x, 1)
    forms = {}
    for policy in ("macs", "latency"):
        start = time.perf_counter()
        lin = tlc.linearize(model, sites, x, policy=policy, table=table)
        forms[policy] = (tlc.merge(lin, x, table=table), time.perf_counter() - start)
    cmp = tlc.compare(forms["macs"][0], forms["latency"][0], one, batch_sizes=(1,), threads=table.threads,
                      labels=("macs", "latency"), repeats=30, rounds=7)
    row = cmp.rows[0]
    return {"model": spec, "sites": which, "linearized": len(sites),
            **{f"{p}_{k}": v for p, (d, s) in forms.items()
               for k, v in (("depth", depth(d, one)), ("macs", count_macs(d, one)), ("seconds", round(s, 1)))},
            "ratio": row["ratio"], "ratio_q1": row.get("ratio_q1"), "ratio_q3": row.get("ratio_q3"),
            "clock": forms["latency"][0].tlc_report.clock}


def prediction_rows(spec: str, model: torch.nn.Module, x: object, sites: list[str], threads: int) -> list[dict]:
    """Predicted against measured latency of the BN-folded original and the all-sites latency deploy form; the
    deploy form is also predicted anchored on the measured original (`LatencyTable.predict(reference=...)`)."""
    rows = []
    for backend in ("eager", "onnxruntime"):
        for batch in (1, 32):
            table = LatencyTable(backend=backend, batch_size=batch, threads=threads)
            folded = tlc.merge(model, x, policy="never")
            deployed = {"bn-folded": folded,
                        "latency-all": tlc.merge(tlc.linearize(model, sites, x, policy="latency", table=table), x,
                                                 table=table)}
            inputs = rebatch(x, batch)
            measured = {name: measure_latency(form, inputs, backend=backend, threads=threads).median_ms / 1e3
                        for name, form in deployed.items()}
            for name, form in deployed.items():
                predicted = table.predict(form, inputs)
                row = {"model": spec, "form": name, "backend": backend, "batch_size": batch,
                       "predicted_ms": 1e3 * predicted, "measured_ms": 1e3 * measured[name],
                       "error": abs(predicted - measured[name]) / measured[name]}
                if form is not folded:
                    anchored = table.predict(form, inputs, reference=(folded, measured["bn-folded"]))
                    row.update(anchored_ms=1e3 * anchored,
                               anchored_error=abs(anchored - measured[name]) / measured[name])
                rows.append(row)
    return rows


def fill_anchored(rows: list[dict]) -> None:
    """Rows recorded before anchored predictions: the same arithmetic as `LatencyTable.predict(reference=...)`
    on their stored numbers (the BN-folded original's measured latency times the table's ratio)."""
    folded = {(r["model"], r["backend"], r["batch_size"]): r for r in rows if r["form"] == "bn-folded"}
    for row in rows:
        reference = folded.get((row["model"], row["backend"], row["batch_size"]))
        if row["form"] == "bn-folded" or "anchored_ms" in row or reference is None:
            continue
        row["anchored_ms"] = reference["measured_ms"] * row["predicted_ms"] / reference["predicted_ms"]
        row["anchored_error"] = abs(row["anchored_ms"] - row["measured_ms"]) / row["measured_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-prediction", dest="prediction", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    done = json.loads(PATH.read_text()) if PATH.is_file() else {"policy": [], "prediction": []}
    fill_anchored(done["prediction"])
    table = LatencyTable(backend="eager", batch_size=1, threads=args.threads)
    for spec in args.models:
        model, x = build(spec)
        randomize_bn(model)
        sets = site_sets(model, x)
        for which, sites in sets.items():
            if any(r["model"] == spec and r["sites"] == which for r in done["policy"]):
                continue
            row = policy_row(spec, which, sites, model, x, table)
            print(json.dumps(row), flush=True)
            done["policy"].append(row)
            save(done, args.threads)
        if args.prediction and not any(r["model"] == spec for r in done["prediction"]):
            rows = prediction_rows(spec, model, x, sets["all"], args.threads)
            print(json.dumps(rows), flush=True)
            done["prediction"] += rows
            save(done, args.threads)
    save(done, done.get("machine", {}).get("threads", args.threads))
    for key in ("error", "anchored_error"):
        errors = [r[key] for r in done["prediction"] if key in r]
        if errors:
            print(f"{key.replace('_', ' ')}: median {statistics.median(errors):.1%}, worst {max(errors):.1%}")


def save(content: dict, threads: int) -> None:
    content["machine"] = {**machine(), "threads": threads}
    content["name"] = "latency-policy"
    tmp = PATH.with_suffix(".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    tmp.replace(PATH)


if __name__ == "__main__":
    main()
