"""The zoo's committed summaries as the markdown the book's benchmark chapter includes.

``scripts/book_generated.py`` writes :func:`zoo_chapter_markdown` to ``book/_generated/zoo.md``
from ``results/zoo/*.json``; a test regenerates it and fails when the committed copy is stale, so
the chapter never shows numbers that the results files do not hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from madeit_core.booktables import Column, markdown_table


def gain_noise(p_probe: float, p_ft: float, n: int) -> float:
    """Half-width of a 95 % interval of the difference of two accuracies measured on ``n`` rows
    each, treated as independent (conservative for the paired rows the zoo has)."""
    return 1.96 * math.sqrt((p_probe * (1 - p_probe) + p_ft * (1 - p_ft)) / max(1, n))


def zoo_table(report: Mapping[str, Any]) -> str:
    """Per task: classes, rows, probe and fine-tuned accuracy (%), gain, its noise, fine-tune time."""
    labels, cols = [], {h: Column(h) for h in ("classes", "probe / fine-tune / test rows", "probe", "fine-tuned",
                                                 "gain", "± (95 %)", "build s")}
    for r in report["tasks"]:
        t = r["task"]
        labels.append(t)
        cols["classes"].cells[t] = str(r["classes"])
        cols["probe / fine-tune / test rows"].cells[t] = f"{r['n_probe_rows']} / {r['n_finetune_rows']} / {r['n_test']}"
        cols["probe"].cells[t] = f"{100 * r['probe']:.1f}"
        cols["fine-tuned"].cells[t] = f"{100 * r['finetuned']:.1f}"
        gain = r["finetuned"] - r["probe"]
        noise = gain_noise(r["probe"], r["finetuned"], r["n_test"])
        cols["gain"].cells[t] = f"{100 * gain:+.1f}" + ("" if abs(gain) > noise else " (in noise)")
        cols["± (95 %)"].cells[t] = f"{100 * noise:.1f}"
        cols["build s"].cells[t] = f"{r['wall_s']:.0f}"
    avg = report["average"]
    labels.append("**average**")
    cols["probe"].cells["**average**"] = f"**{100 * avg['probe']:.2f}**"
    cols["fine-tuned"].cells["**average**"] = f"**{100 * avg['finetuned']:.2f}**"
    cols["gain"].cells["**average**"] = f"**{100 * avg['gain']:+.2f}**"
    cols["build s"].cells["**average**"] = f"{report['wall_s_total']:.0f} (total)"
    return markdown_table(labels, list(cols.values()), corner="task")


def ceiling_table(ceilings: Sequence[Mapping[str, Any]], report: Mapping[str, Any] | None = None) -> str:
    """The reading ceiling of each rendered-text task (:mod:`madeit_core.data.reading_ceiling`),
    beside the zoo's probe and fine-tuned accuracy when ``report`` has the task."""
    zoo = {r["task"]: r for r in (report or {}).get("tasks", [])}
    heads = ("characters shown / whole text", "majority class", "perfect reader: fine-tune rows",
             "perfect reader: whole texts", "perfect reader: 20k rows", "probe", "fine-tuned")
    cols = {h: Column(h) for h in heads}
    labels = []
    for c in ceilings:
        t = c["task"]
        labels.append(t)
        cols[heads[0]].cells[t] = f"{c['chars_shown_mean']:.0f} / {c['chars_full_mean']:.0f}"
        cols[heads[1]].cells[t] = f"{100 * c['chance']:.1f}"
        cols[heads[2]].cells[t] = f"{100 * c['visible']:.1f}"
        cols[heads[3]].cells[t] = f"{100 * c['full_text']:.1f}"
        cols[heads[4]].cells[t] = f"{100 * c['visible_all_rows']:.1f}"
        if t in zoo:
            cols["probe"].cells[t] = f"{100 * zoo[t]['probe']:.1f}"
            cols["fine-tuned"].cells[t] = f"{100 * zoo[t]['finetuned']:.1f}"
    return markdown_table(labels, list(cols.values()), corner="task")


def learnability_table(doc: Mapping[str, Any]) -> str:
    """Fine-tuning a rendered-text task under variants (:mod:`madeit_core.text_learnability`)."""
    heads = ("rows", "steps", "lr", "chars", "probe", "tuned", "gain", "train")
    cols = {h: Column(h) for h in heads}
    labels = []
    for r in doc["rows"]:
        t = f"{r['task']}: {r['variant']['name']}"
        labels.append(t)
        vals = (f"{r['rows']['probe']} + {r['rows']['finetune']}", str(r["steps"]), f"{r['lr']:g}",
                f"{r['chars_shown_mean']:.0f}", f"{100 * r['probe']:.1f}", f"{100 * r['finetuned']:.1f}",
                f"{100 * r['gain']:+.1f} (±{100 * r['noise95']:.1f})",
                f"{100 * r['train_accuracy_last_fifth']:.1f}")
        for h, v in zip(heads, vals, strict=True):
            cols[h].cells[t] = v
    return markdown_table(labels, list(cols.values()), corner="task: variant")


def zoo_chapter_markdown(reports: Mapping[str, Mapping[str, Any]], ceilings: Mapping[str, Any] | None,
                         learnability: Mapping[str, Any] | None = None) -> str:
    """The include of the benchmark chapter: the largest group's table, the group averages and
    checks, and the reading ceilings."""
    if not reports:
        return "*No zoo summary is committed under `results/zoo/` yet.*\n"
    groups = sorted(reports, key=lambda g: len(reports[g]["tasks"]))
    big = reports[groups[-1]]
    rec = big["recipe"]
    out = ["<!-- generated by scripts/book_generated.py from results/zoo/*.json; do not edit -->",
           "",
           f"Profile `{big['profile']}`, {big['backbone']} at {big['image_size']} px, built on "
           f"`{big['device']}` ({big['hardware'].get('cpu_count')} CPU cores, torch threads "
           f"{big['hardware'].get('torch_threads')}); recipe: {rec['steps']} steps of {rec['batch_size']}, "
           f"AdamW lr {rec['lr']:g}, recipe version {rec['recipe_version']}. Accuracies in % on the "
           "evaluated test rows; *in noise* marks a gain smaller than the 95 % half-width for two "
           "independent accuracies on that many rows (conservative: the rows are paired). Source: "
           f"`results/zoo/{big['group']}.json`.",
           "",
           zoo_table(big),
           "",
           "| group | tasks | probe | fine-tuned | gain | gain ≥ 10 points | every fine-tuned model beats its probe |",
           "|---|---|---|---|---|---|---|"]
    for g in groups:
        r = reports[g]
        ch = r["checks"]
        beat = "yes" if ch["every_finetuned_beats_probe"] else "no: " + ", ".join(ch["not_beating"])
        out.append(f"| `{g}` | {len(r['tasks'])} | {100 * r['average']['probe']:.2f} | "
                   f"{100 * r['average']['finetuned']:.2f} | {100 * r['average']['gain']:+.2f} | "
                   f"{'yes' if ch['gain_ok'] else 'no'} | {beat} |")
    if ceilings:
        out += ["", "(zoo-reading-ceiling)=",
                f"**Can the rendered text be learned from these rows?** A bag-of-words logistic regression "
                f"that reads the words without error, trained on exactly the text the fine-tuning rows "
                f"show and scored on the text the test rows show (`madeit data ceiling --profile "
                f"{ceilings.get('profile', big['profile'])}`; source `results/zoo/reading_ceiling-"
                f"{ceilings.get('profile', big['profile'])}.json`):",
                "", ceiling_table(ceilings["tasks"], big)]
    if learnability and learnability.get("rows"):
        prof = learnability.get("profile", big["profile"])
        out += ["", "(zoo-text-learnability)=",
                "**Does the encoder learn to read with more?** The zoo's own procedure (probe on θ0's "
                "features, then fine-tuning with head and BatchNorm frozen) with one change each, scored "
                f"on the whole test pool (`madeit data learnability --profile {prof}`; source "
                f"`results/zoo/text_learnability-{prof}.json`; the last row trains the head too, which "
                "the protocol does not: a diagnostic). Accuracies in %; *rows*: probe + fine-tuning rows; "
                "*chars*: characters shown per test image; *gain* with its 95 % noise half-width; *train*: "
                "running training accuracy over the last fifth of fine-tuning:",
                "", learnability_table(learnability)]
    return "\n".join(out) + "\n"


__all__ = ["ceiling_table", "gain_noise", "learnability_table", "zoo_chapter_markdown", "zoo_table"]
