"""Ratios, targets and the printed table."""

# name -> (numerator, denominator, section, target): ratio of medians <= target.
TARGETS = {
    "train: keras-lora / keras built-in (q/v)": (
        "keras-lora q/v",
        "keras built-in q/v",
        "train",
        0.85,
    ),
    "train: keras-lora / keras built-in (all-linear)": (
        "keras-lora all-linear",
        "keras built-in all-linear",
        "train",
        0.70,
    ),
    "train: keras-lora (q/v) / full fine-tuning": (
        "keras-lora q/v",
        "full fine-tuning",
        "train",
        0.55,
    ),
    # DoRA's price: the norm of W + s·ΔW needs the kernel-shaped ΔW each step.
    "train: keras-lora DoRA (q/v) / keras-lora (q/v)": (
        "keras-lora DoRA q/v",
        "keras-lora q/v",
        "train",
        None,
    ),
    "train: keras-lora DoRA (q/v) / keras built-in (q/v)": (
        "keras-lora DoRA q/v",
        "keras built-in q/v",
        "train",
        None,
    ),
    "inference: merged / base": ("merged", "base", "inference", 1.02),
    "inference: keras-lora unmerged / base": (
        "keras-lora unmerged",
        "base",
        "inference",
        None,
    ),
}


def ratios(results):
    """Computes every ratio the results allow; returns name -> dict."""
    out = {}
    for name, (num, den, section, target) in TARGETS.items():
        data = results.get(section)
        if not data or num not in data or den not in data:
            continue
        value = data[num]["median_s"] / data[den]["median_s"]
        cpu = data[num]["median_cpu_s"] / data[den]["median_cpu_s"]
        out[name] = {"value": value, "cpu_value": cpu, "target": target}
    memory = results.get("memory")
    if memory:
        lora, full = memory.get("keras-lora q/v"), memory.get("full fine-tuning")
        if lora and full and full["training_mb"] > 0:
            out["peak training memory: keras-lora / full"] = {
                "value": lora["training_mb"] / full["training_mb"],
                "target": 0.5,
            }
            if full["first_step_mb"] > 0:
                out["peak memory incl. compile (1st step): keras-lora / full"] = {
                    "value": lora["first_step_mb"] / full["first_step_mb"],
                    "target": None,
                }
    files = results.get("files")
    if files and "adapter_over_full" in files:
        out["file size: adapter / full model"] = {
            "value": files["adapter_over_full"],
            "target": None,
        }
    for item in out.values():
        target = item["target"]
        item["met"] = None if target is None else item["value"] <= target
    return out


def _fmt_s(seconds):
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def table(results):
    """The human-readable summary, as a Markdown table and a few lines."""
    lines = [
        f"backend: {results['backend']}   date: {results['date']}   "
        f"rounds: {results['settings']['rounds']}   "
        f"steps/round: {results['settings']['steps']}",
        "",
        "| measure | ratio (wall) | ratio (CPU time) | target | met (wall) |",
        "|---|---|---|---|---|",
    ]
    for name, item in results["ratios"].items():
        target = "-" if item["target"] is None else f"<= {item['target']:.2f}"
        met = "-" if item["met"] is None else ("yes" if item["met"] else "NO")
        cpu = f"{item['cpu_value']:.3f}" if "cpu_value" in item else "-"
        lines.append(f"| {name} | {item['value']:.3f} | {cpu} | {target} | {met} |")
    lines.append("")
    for section in ("train", "inference"):
        for name, data in results.get(section, {}).items():
            if isinstance(data, dict) and "median_s" in data:
                extra = (
                    f", {data['trainable_params']:,} trainable"
                    if "trainable_params" in data
                    else ""
                )
                lines.append(
                    f"{section} {name}: median {_fmt_s(data['median_s'])} "
                    f"(CPU {_fmt_s(data['median_cpu_s'])}){extra}"
                )
    memory = results.get("memory")
    if memory:
        for name, m in memory.items():
            lines.append(
                f"memory {name}: training {m['training_mb']:.0f} MiB, first step "
                f"(with compile) {m['first_step_mb']:.0f} MiB, peak RSS "
                f"{m['peak_rss_mb']:.0f} MiB"
            )
    files = results.get("files")
    if files:
        if "adapter_mb" in files:
            lines.append(f"adapter file: {files['adapter_mb']:.3f} MiB")
        lines.append(
            f"full model file ({files['full_model_file']}): "
            f"{files['full_model_mb']:.1f} MiB"
        )
    large = results.get("large")
    if large:
        parts = [
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v:,}"
            for k, v in large.items()
        ]
        lines.append("large model: " + ", ".join(parts))
    return "\n".join(lines)
