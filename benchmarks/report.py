"""The Markdown summary of a results document (``summary.md``)."""

from __future__ import annotations

import math

__all__ = ["markdown", "table"]


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table; ``columns`` are ``(key, header)`` pairs."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def _overhead(it: dict) -> list[str]:
    rows = {}
    for r in it["rows"]:
        row = rows.setdefault(r["model"], {"model": r["model"]})
        row[f"{r['variant']}_ms"] = r["median_ms"]
        row[f"{r['variant']}_ratio"] = r["ratio_vs_plain"]
        if "loss_rel_diff_plain_vs_pyro" in r:
            row["loss_diff"] = r["loss_rel_diff_plain_vs_pyro"]
    for row in rows.values():
        row["met"] = max(row.get("trainer_ratio", 9), row.get("svi_ratio", 9)) <= 1.10
    cols = [("model", "model"), ("plain_ms", "hand-written PyTorch (ms)")]
    if any("plain_nosync_ms" in r for r in rows.values()):
        cols += [("plain_nosync_ms", "the same, no .item() (ms)")]
    cols += [("trainer_ms", "pyroseg Trainer (ms)"), ("trainer_ratio", "Trainer / plain")]
    for v, label in (("trainer_fused", "Trainer, fused Adam + device guard"), ("trainer_loop", "Trainer, loop Adam + host guard"),
                     ("trainer_host_sync", "Trainer, earlier step (host reads)")):
        if any(f"{v}_ms" in r for r in rows.values()):
            cols += [(f"{v}_ms", f"{label} (ms)"), (f"{v}_ratio", f"{label} / plain")]
    cols += [("svi_ms", "pyro SVI.step (ms)"), ("svi_ratio", "SVI / plain"),
             ("met", f"target {it['target']}"), ("loss_diff", "loss rel. diff. plain vs Pyro")]
    return ["## 1. Pyro overhead", "", it["what"] + ".", "", table(list(rows.values()), cols), ""]


def _throughput(it: dict) -> list[str]:
    sizes = sorted({r["size"] for r in it["rows"]})
    rows = {}
    for r in it["rows"]:
        row = rows.setdefault(r["model"], {"model": r["model"]})
        s = r["size"]
        if "error" in r:
            row[f"ips{s}"] = "error"
            continue
        row[f"ips{s}"] = r["images_per_s"]
        row[f"rel{s}"] = r.get("relative_to_plain_unet")
        row[f"mem{s}"] = r.get("cuda_peak_mib", r.get("peak_rss_mib"))
    cols = [("model", "model")]
    for s in sizes:
        cols += [(f"ips{s}", f"{s}x{s} images/s"), (f"rel{s}", f"{s}: x plain U-Net"), (f"mem{s}", f"{s}: peak MiB")]
    return ["## 2. Training throughput", "", it["what"] + ".", "", table(list(rows.values()), cols), ""]


def _sampling(it: dict) -> list[str]:
    rows = it["rows"]
    if not rows:
        return []
    ms = sorted(int(k[4:]) for k in rows[0] if k.startswith("ms_n"))
    cols = [("model", "model")] + [(f"ms_n{n}", f"n={n} (ms)") for n in ms]
    cols += [(f"ratio_n{n}", f"t({n})/t({ms[0]})") for n in ms[1:]]
    cols += [("per_sample_ms", "per sample (ms)"), ("once_ms", "once (ms)"), ("target_ratio_n100", "target t(100)/t(1)"),
             ("meets_target", "met"), ("limit", "what limits it")]
    return ["## 3. Sampling cost", "", it["what"] + ".", "", table(rows, cols), ""]


def _data(it: dict) -> list[str]:
    out = ["## 4. Data", "", f"Targets: cached load {it['targets']['cached_load']}, data wait {it['targets']['data_wait']}.", ""]
    if it.get("note"):
        out += [it["note"] + ".", ""]
    if it.get("loads"):
        out += [table(it["loads"], [("size", "size"), ("slices", "slices"), ("first_load_s", "first load (s)"),
                                    ("cached_load_s", "cached load (s)"), ("cached_scan_and_key_s", "of which scan + stat (s)"),
                                    ("meets_target", "cached < 1 s")]), ""]
    waits = it.get("waits") or ([it["wait"]] if it.get("wait") else [])
    for w in waits:
        mode = f", --data-on-device {w['data_on_device']}" if "data_on_device" in w else ""
        if "error" in w:
            out += [f"Data wait{mode}: error {w['error']}", ""]
        else:
            out += [f"Data wait ({w['model']}, {w['size']}x{w['size']}, {w['data']} data, {w['batches']} batches{mode}): "
                    f"{1e3 * w['data_wait_s']:.1f} ms waiting of {w['epoch_s']:.2f} s = **{100 * w['data_wait_share']:.2f} %** "
                    f"(target met: {_fmt(w['meets_target'])})"
                    + (f"; {w['images_per_s']:.0f} images/s" if "images_per_s" in w else "") + ".", ""]
    return out


def _scaling(it: dict) -> list[str]:
    return [
        "## 5. Scaling", "", it["what"], f"Data: {it['data']}.", "",
        table(it["by_slices"], [("fraction", "fraction of train split"), ("slices", "slices"), ("epoch_s", "epoch (s)"),
                                ("ms_per_slice", "ms per slice"), ("ms_per_slice_relative", "relative (1 = linear)"),
                                ("data_wait_share", "data wait share"), ("error", "error")]),
        "",
        table(it["by_size"], [("size", "size"), ("slices", "slices"), ("epoch_s", "epoch (s)"), ("us_per_pixel", "us per pixel"),
                              ("us_per_pixel_relative", "relative (1 = linear in pixels)"), ("peak_rss_mib", "peak RSS MiB"),
                              ("cuda_peak_mib", "GPU peak MiB"), ("skipped", "skipped"), ("error", "error")]),
        "",
    ]


def _options(it: dict) -> list[str]:
    return [
        "## 6. Speed options, on vs off", "", it["what"] + ".", "",
        table(it["rows"], [("option", "option"), ("model", "model"), ("measures", "measures"), ("on_ms", "on (ms)"),
                           ("off_ms", "off (ms)"), ("off_over_on", "off / on"), ("default", "library default"),
                           ("flag", "to turn off"), ("note", "note")]),
        "",
    ]


SECTIONS = {"overhead": _overhead, "throughput": _throughput, "sampling": _sampling, "data": _data,
            "scaling": _scaling, "options": _options}


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [
        "# pyroseg benchmarks", "",
        f"Command: `{doc['command']}`", "",
        f"Device: {env['device']}{' (' + env['gpu'] + ')' if env.get('gpu') else ''}; torch {env['torch']}, "
        f"pyro {env['pyro']}; torch threads {env['torch_threads']}, CPUs {env['cpu_count']}"
        f"{', affinity ' + str(env['cpu_affinity']) if 'cpu_affinity' in env else ''}"
        f"{', load average at start ' + str(env['loadavg_at_start']) if 'loadavg_at_start' in env else ''}; {env['time']}.",
        "",
    ]
    for m in doc.get("merged_from", []):
        lines += [f"Items not re-run come from: `{m['command']}` ({m['environment']['time']}).", ""]
    if doc["settings"].get("quick"):
        lines += ["**Quick mode: a smoke run with tiny sizes; these figures mean nothing.**", ""]
    for name in [n for n in SECTIONS if n in doc["items"]]:
        it = doc["items"][name]
        lines += SECTIONS[name](it)
        if it.get("command") and it["command"] != doc["command"]:
            lines += [f"(Measured by `{it['command']}`.)", ""]
    if "seconds" in doc:
        lines += [f"Whole run: {doc['seconds']:.0f} s.", ""]
    return "\n".join(lines)
