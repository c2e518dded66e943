"""Presenting a bench report: the text table and the speed-vs-FID (or FLOPs) plot."""

from __future__ import annotations

from pathlib import Path

def format_table(report: dict) -> str:
    has_eval = any(r["eval"] for r in report["rows"])
    head = f"{'row':<36}{'steps':>9}{'median s':>10}{'spread':>8}{'img/s':>9}{'speedup':>9}{'TFLOP/img':>11}{'FLOPs x':>9}{'GFLOP/s':>9}{'peak MiB':>10}"
    if has_eval:
        head += f"{'FID':>8}{'±':>6}{'vs base':>8}{'recall':>8}{'vs base':>8}{'acc':>7}"
    lines = [f"{report['model']} on {report['device']} ({report['device_name']}), batch {report['batch_size']}, "
             f"{report['num_images']} images, {report['warmup']} warm-up + {report['repeats']} interleaved repeats; "
             f"matmul {report['matmul_gflops']:.1f} GFLOP/s ({report['matmul_dtype']})", head]
    for r in report["rows"]:
        s = r["sampler"]
        e = r["executed"]
        steps = f"{e['ar_steps']}/{e['mean_head_steps']:.3g}" if e.get("mean_head_steps") else f"{s['num_iter']}/{s['head_steps']}"
        line = (f"{r['label'][:35]:<36}{steps:>9}{r['seconds']['median']:>10.3f}"
                f"{r['seconds']['spread']:>8.1%}{r['images_per_second']:>9.2f}{r['wallclock_speedup']:>8.2f}x"
                f"{r['tflops_per_image']:>11.4g}{r['flops_ratio']:>8.2f}x{r['achieved_gflops']:>9.1f}"
                f"{(r['peak_memory_bytes'] or 0) / 2**20:>10.0f}")
        if has_eval:
            e = r["eval"] or {}
            fid, recall, acc = e.get("fid"), e.get("recall"), e.get("class_accuracy")
            line += f"{fid:>8.2f}" if fid is not None else f"{'-':>8}"
            spread = e.get("fid_spread")
            line += f"{spread:>6.2f}" if spread is not None else f"{'-':>6}"
            line += f"{e.get('vs_baseline') or '-':>8}"
            line += f"{recall:>8.3f}" if recall is not None else f"{'-':>8}"
            line += f"{e.get('recall_vs_baseline') or '-':>8}"
            line += f"{acc:>7.3f}" if acc is not None else f"{'-':>7}"
        lines.append(line)
    lines.append("steps = executed AR steps / mean head steps per token; speedup = baseline median / row median; FLOPs x = baseline FLOPs / row FLOPs; "
                 "spread = (max - min) / median; ± = FID seed spread (max - min over --eval-seeds), vs base = tie when the FID "
                 "(recall) difference is within the larger FID (recall) seed spread; " + report["peak_memory_kind"])
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Speed (images/s) against FID, or against TFLOPs/image when no row was evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    has_eval = all(r["eval"] and r["eval"].get("fid") is not None for r in rows)
    giga = max(r["tflops_per_image"] for r in rows) < 0.1  # small models: GFLOPs
    fig, ax = plt.subplots(figsize=(9, 4.5))
    markers = {"baseline": ("s", "black"), "policy": ("o", "tab:red"), "fewer_ar_steps": ("v", "tab:blue"),
               "fewer_head_steps": ("^", "tab:green"), "fewer_mixed_steps": ("D", "tab:purple")}
    for i, r in enumerate(rows, 1):
        y = r["eval"]["fid"] if has_eval else r["tflops_per_image"] * (1e3 if giga else 1)
        m, c = markers.get(r["kind"], ("x", "gray"))
        e = r["executed"]
        ax.scatter(r["images_per_second"], y, marker=m, color=c, s=60,
                   label=f"{i}: {r['label']} [{e.get('ar_steps')}/{(e.get('mean_head_steps') or 0):.3g}]")
        ax.annotate(str(i), (r["images_per_second"], y), textcoords="offset points", xytext=(5, 4 + 7 * (i % 2)), fontsize=8)
    ax.set_xlabel("images / s (median)")
    ax.set_ylabel("FID (lower is better)" if has_eval else ("GFLOPs / image" if giga else "TFLOPs / image"))
    ax.set_title(f"{report['model']} on {report['device_name']} (batch {report['batch_size']}, "
                 f"median of {report['repeats']} interleaved runs)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="row [AR steps/mean head steps]", title_fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
