"""The table of a ``tlc benchmark``: one line per contender, as text (printed) or Markdown (docs)."""

from __future__ import annotations

from typing import Any

from tlc.measure.compare import si

COLUMNS = ("method", "val acc", "Δ pt", "test acc", "depth", "act.", "params", "unique", "MACs")


def speed_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The latency rows measured (``backend@batch``), in measurement order."""
    timed = next((r for r in rows if "latency" in r), None)
    return list(timed["latency"]) if timed else []


def _speed(row: dict[str, Any], key: str, reference: str = "original") -> str:
    s = (row.get("latency") or {}).get(key, {}).get("speedup", {}).get(reference)
    return f"x{s['ratio']:.2f} ({s['q1']:.2f}-{s['q3']:.2f})" if s else "-"


def _percent(value: float | None) -> str:
    return f"{100 * value:.2f}" if value is not None else "-"


def benchmark_cells(row: dict[str, Any], original: dict[str, Any], keys: list[str]) -> list[str]:
    """The cells of one contender's line (the same for text and Markdown)."""
    if row["status"] != "done":
        return [row["label"], f"not run: {row['reason']}"]
    drop = 100 * (row["val_accuracy"] - original["val_accuracy"])
    cells = [row["label"] + ("" if row.get("changed") or row["kind"] == "original" else " (unchanged)"),
             _percent(row["val_accuracy"]), f"{drop:+.2f}" if row["kind"] != "original" else "",
             _percent(row.get("test_accuracy")), str(row["depth"]), str(row["activations"]), si(row["params"]),
             si(row["unique_params"]), si(row["macs"])]
    cells += [_speed(row, key) for key in keys]
    cells += [_speed(row, keys[0], "bn-folded") if keys else "-",
              f"{row.get('wall_time_s', 0.0):.0f}" if row["kind"] != "original" else "",
              f"{row.get('finetune_epochs', 0.0):.2f}" if row["kind"] != "original" else "", _note(row)]
    return cells


def _note(row: dict[str, Any]) -> str:
    """Why a contender is unchanged, or what a width baseline was matched to."""
    if row["kind"] == "width":
        return f"MACs of {row['matched_to']}" + (f"; {row['reason']}" if row.get("reason") else "")
    if row["kind"] == "depth" and not row.get("changed"):
        reason = row.get("stop_reason") or row.get("reason") or ""
        return reason if len(reason) <= 90 else reason[:89] + "…"
    return ""


def _header(keys: list[str]) -> list[str]:
    first = keys[0] if keys else "-"
    return [*COLUMNS, *(f"speed-up {k}" for k in keys), f"vs BN-folded {first}", "time s", "ft epochs", "note"]


def format_benchmark(rows: list[dict[str, Any]], timing: dict[str, Any]) -> str:
    """Fixed-width text of the benchmark table, with the conditions of the timing under it."""
    keys = speed_keys(rows)
    lines = [_header(keys)] + [benchmark_cells(r, rows[0], keys) for r in rows]
    widths = [max(len(line[i]) for line in lines if i < len(line) and len(line) > 2) for i in range(len(lines[0]))]
    text = []
    for line in lines:
        if len(line) == 2:  # a contender that did not run: its reason across the line
            text.append(f"{line[0]:<{widths[0]}}  {line[1]}")
        else:
            last = len(line) - 1
            text.append("  ".join(c.ljust(w) if i in (0, last) else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(line, widths))).rstrip())
    text.append(f"(speed-ups: latency of the original / of the model, median of {timing.get('rounds')} interleaved "
                f"rounds (quartiles), {timing.get('threads')} threads on {timing.get('device')}; MACs at batch 1)")
    return "\n".join(text)


def markdown_benchmark(rows: list[dict[str, Any]]) -> str:
    """The benchmark table in Markdown."""
    keys = speed_keys(rows)
    header = _header(keys)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = benchmark_cells(row, rows[0], keys)
        if len(cells) == 2:
            cells = [cells[0], cells[1]] + [""] * (len(header) - 2)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["benchmark_cells", "format_benchmark", "markdown_benchmark", "speed_keys"]
