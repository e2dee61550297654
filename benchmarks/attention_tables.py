"""The Markdown tables of ``attention.py``'s results: one row per shape and model, the launch
sweeps (fastest setting marked) and the fused path's kernels."""

from __future__ import annotations

from common import card


def results_table(rows: list[dict], info: dict) -> list[str]:
    md = [
        f"# Attention forward + backward, {card(info)}, torch {info['versions'].get('torch')}, commit {info['commit']}",
        "",
        "Forward + backward of one attention call. `reference`: PyTorch eager (the target's baseline); `compiled`: the same under "
        "`torch.compile`; `fused`: the Triton kernels, and its parts (forward kernel, dK/dV kernel, dQ kernel, "
        "the bias maps with their table gradients) timed alone. "
        "These are launched from Python (host time included); `graphed`: forward + backward recorded in a CUDA graph and replayed, "
        "the GPU time alone, as inside the graphed training step. `lengths`: the batch's real positions per sequence "
        "(padding after them, as in training; "
        "drawn from the shape's length distribution), which the fused kernels skip and the reference computes in full; `full`: no padding. "
        "`split` (FuXi only): the kernels compute the semantic channel and the positional and "
        'temporal channels are two batched matrix products over all heads outside them (`fused_attention.BIAS_CHANNELS = "matmul"`).',
        "",
        "| shape | model | B x N, H, qk/v | lengths | dtype | reference ms | compiled ms | fused ms | speedup vs reference | vs compiled "
        "| reference graphed ms | fused graphed ms | graphed speedup "
        "| fused parts: fwd / bwd_kv / bwd_q / bias ms | reference peak GB | compiled peak GB | fused peak GB | max abs diff "
        "| split ms | split graphed ms "
        "| split graphed speedup | split peak GB |",
        "|" + "---|" * 22,
    ]
    for r in rows:
        pt = r.get("parts")
        parts = " / ".join(f"{pt[k]:.3f}" for k in ("fwd", "bwd_kv", "bwd_q", "bias_tables")) if pt else "-"
        gr = f"{r['reference_graphed_ms']:.3f} | {r['fused_graphed_ms']:.3f} | {r['speedup_graphed']:.2f}x" if "speedup_graphed" in r else "- | - | -"
        comp = f"{r['reference_compiled_ms']:.2f}" if "reference_compiled_ms" in r else "-"
        vs = f"{r['speedup_vs_compiled']:.2f}x" if "speedup_vs_compiled" in r else "-"
        ln = r.get("lengths", "full")
        ln = ln if isinstance(ln, str) else f"mean {ln['mean']:.0f} ({ln['min']}-{ln['max']})"
        md.append(
            f"| {r['shape']} | {r['model']} | {r['B']} x {r['N']}, {r['H']}, {r['qk_dim']}/{r['v_dim']} | {ln} | {r['dtype']} "
            f"| {r['reference_ms']:.2f} | {comp} | {r['fused_ms']:.2f} | "
            f"{r['speedup']:.2f}x | {vs} | {gr} | {parts} | {r.get('reference_peak_gb', 0):.3f} | {r.get('reference_compiled_peak_gb', 0):.3f} "
            f"| {r.get('fused_peak_gb', 0):.3f} | {r['max_abs_diff']:.2e} | "
            + (f"{r['fused_split_ms']:.2f} | " if "fused_split_ms" in r else "- | ")
            + (f"{r['fused_split_graphed_ms']:.3f} | {r['speedup_split_graphed']:.2f}x | " if "speedup_split_graphed" in r else "- | - | ")
            + f"{r.get('fused_split_peak_gb', 0):.3f} |"
        )
    return md


def sweep_tables(sweeps: dict) -> list[str]:
    md: list[str] = []
    for key, table in sweeps.items():
        names = list(table)
        md += [
            "",
            f"Sweep at {key} (GPU ms per kernel call, from ten calls replayed in a CUDA graph; fastest marked):",
            "",
            "| setting | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        best = {n: min((ms for _, ms, _ in t if ms is not None), default=None) for n, t in table.items()}
        for i, (setting, _, _) in enumerate(table["fwd"]):
            cells = []
            for n in names:
                ms, err_ = table[n][i][1], table[n][i][2]
                cells.append(err_ or (f"**{ms:.3f}**" if ms == best[n] else f"{ms:.3f}"))
            md.append(f"| {tuple(setting)} | " + " | ".join(cells) + " |")
    return md


def kernel_tables(rows: list[dict]) -> list[str]:
    md: list[str] = []
    for r in rows:
        if r.get("fused_kernels"):
            md += [
                "",
                f"Kernels of the fused path, {r['shape']} {r['model']} (GPU ms per forward + backward, eager, torch.profiler):",
                "",
                "| kernel | ms | calls |",
                "|---|---|---|",
            ]
            md += [f"| `{k['name'][:70]}` | {k['ms']:.4f} | {k['calls']:.0f} |" for k in r["fused_kernels"]]
    return md
