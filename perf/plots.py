"""PNG plots of benchmark results (matplotlib, Agg), each stamped with the machine it ran on."""

from __future__ import annotations

import os
import platform

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def machine_info() -> dict:
    """CPU model and count, memory, kernel and Python: where a number came from."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo") as f:
            memory_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def machine_line(result: dict) -> str:
    m = result.get("machine") or machine_info()
    return f"{m.get('cpus')} x {m.get('cpu')}, {m.get('memory_gib')} GiB, {m.get('platform')}"


def finish_figure(fig, ax, result: dict, path: str) -> None:
    fig.text(0.01, 0.01, machine_line(result), fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_wan(result: dict, path: str) -> None:
    """Grouped bars per congestion control: kvwire by streams, default, tuned; iperf3 -P 1/-P 8."""
    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.6), squeeze=False, sharey=True)
    for ax, run in zip(axes[0], runs):
        labels, values, colors = [], [], []
        for key, value in run["kvwire_mbit"].items():
            streams = (run.get("kvwire_details") or {}).get(key, {}).get("num_streams")
            labels.append(f"kvwire\n{key}" + (f" ({streams})" if key in ("default", "tuned") and streams else ""))
            values.append(value or 0)
            colors.append({"default": "tab:red", "tuned": "tab:green"}.get(key, "tab:blue"))
        for key, value in run["iperf3_mbit"].items():
            labels.append(f"iperf3\n-P {key}")
            values.append(value or 0)
            colors.append("tab:gray")
        bars = ax.bar(range(len(values)), values, color=colors)
        raw = [*run["kvwire_mbit"].values(), *run["iperf3_mbit"].values()]
        ax.bar_label(bars, labels=["failed" if v is None else f"{v:.0f}" for v in raw], fontsize=7)
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        link = run["link"]
        ax.axhline(link["rate_mbit"], color="k", lw=0.8, ls=":", label="link rate")
        if run["iperf3_mbit"].get("8"):
            ax.axhline(0.95 * run["iperf3_mbit"]["8"], color="tab:red", lw=0.8, ls="--", label="0.95 x iperf3 -P 8")
        ax.set_title(
            f"{run['cc']}: {link['rate_mbit']:.0f} Mbit/s, {link['rtt_ms']:.0f} ms RTT "
            f"(measured {run['rtt_measured_ms']}), {link['loss']:.2%} loss, MTU {link['mtu']}",
            fontsize=8,
        )
        ax.set_ylim(0, link["rate_mbit"] * 1.2)
        ax.legend(fontsize=7, loc="upper right", ncol=2)
    axes[0][0].set_ylabel("goodput, Mbit/s")
    fig.suptitle(f"perf wan: {result['bytes_per_transfer'] / 2**30:.3g} GiB per transfer", fontsize=10)
    finish_figure(fig, axes[0][0], result, path)


def plot_transfer(result: dict, path: str) -> None:
    """kvwire vs one raw socket on loopback, per configuration."""
    runs = result["runs"]
    labels = [
        f"{r['case'].replace('small_blocks_65536x1KiB', '65536 x 1 KiB')}\n{r['streams']} streams"
        + (f", {r['into']}" if r.get("into") else "")
        for r in runs
    ]
    xs = range(len(runs))
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(runs)), 4))
    width = 0.38
    kv = ax.bar([x - width / 2 for x in xs], [r["gbps"] for r in runs], width, label="kvwire")
    raw = ax.bar(
        [x + width / 2 for x in xs], [r["baseline_gbps"] for r in runs], width, label="raw socket", color="tab:gray"
    )
    for bars in (kv, raw):
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("GB/s (1e9 bytes/s), best of repeats")
    ax.set_title("perf transfer: loopback throughput", fontsize=10)
    ax.legend(fontsize=8)
    finish_figure(fig, ax, result, path)


def plot_generic(result: dict, path: str) -> None:
    """Every numeric value up to two levels deep, as horizontal bars (for benchmarks without their own plot)."""
    items = []
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            items.append((key, value))
        elif isinstance(value, dict):
            items += [
                (f"{key}.{k}", v) for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            ]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(items) + 1)))
    if items:
        ax.barh([k for k, _ in items], [v for _, v in items])
        ax.tick_params(labelsize=7)
    else:
        ax.text(0.5, 0.5, "no numeric results", ha="center")
    ax.set_title(f"perf {result.get('benchmark', '?')}", fontsize=10)
    finish_figure(fig, ax, result, path)


def plot_gpu_check(result: dict, path: str) -> None:
    """Every throughput of perf/gpu_check.sh's JSON (keys ending in ``gbps``, at any depth),
    one bar each, so kvwire's figures stand next to the baselines measured in the same call."""
    bars: list[tuple[str, float]] = []

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{prefix}[{i}]")
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and prefix.endswith("gbps"):
            bars.append((prefix, float(node)))

    walk(result, "")
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(bars) + 1)))
    if bars:
        ax.barh([k for k, _ in bars][::-1], [v for _, v in bars][::-1])
        ax.set_xlabel("GB/s")
        ax.tick_params(labelsize=6)
    else:
        ax.text(0.5, 0.5, "no throughput in this run (see the JSON's errors)", ha="center")
    ax.set_title(f"gpu_check on {result.get('device', '?')} at {result.get('commit') or '?'}", fontsize=10)
    finish_figure(fig, ax, result, path)


def plot_codec(result: dict, path: str) -> None:
    """perf.codec's own plot takes its rows."""
    from perf import codec

    codec.plot(result["rows"], path)


def plot_router(result: dict, path: str) -> None:
    """Per policy: throughput (left) and TTFT P50/P90 (right)."""
    policies = result["policies"]
    names = list(policies)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    bars = left.bar(names, [policies[n]["throughput_req_s"] for n in names], color=["tab:green", "tab:blue", "tab:orange"])
    left.bar_label(bars, fmt="%.2f", fontsize=8)
    left.set_ylabel("requests / s")
    left.set_title("throughput (burst)", fontsize=10)
    xs = range(len(names))
    for offset, key, color in ((-0.2, "ttft_p50_s", "tab:blue"), (0.2, "ttft_p90_s", "tab:red")):
        bars = right.bar([x + offset for x in xs], [policies[n][key] or 0 for n in names], 0.4, label=key[5:8].upper(),
                         color=color)
        right.bar_label(bars, fmt="%.2f", fontsize=8)
    right.set_xticks(list(xs), names)
    right.set_ylabel("seconds")
    right.set_title("time to first token", fontsize=10)
    right.legend(fontsize=8)
    link, load = result["link"], result["workload"]
    fig.suptitle(f"perf router: {load['requests']} requests, log-normal lengths (median {load['lognormal_median']}), "
                 f"t={load['threshold_tokens']}; PrfaaS link {link['rate_mbit']:g} Mbit/s, {link['rtt_ms']:g} ms",
                 fontsize=9)
    finish_figure(fig, left, result, path)


PLOTS = {"wan": plot_wan, "transfer": plot_transfer, "codec": plot_codec, "router": plot_router}
