"""The novelty gate's runs so far, one row per run file (issue 37):

    python benchmarks/gate_table.py

writes the tables of benchmarks/results/novelty-routing/README.md (between its ``gate-table``
markers) from the run files under benchmarks/results/novelty-routing/gate-*/ (every setting,
every seed that has landed; ``gate-summary``: the one-commit comparison's means), between its
``gate-prompts-table`` markers from gate-prompts-*/gate_prompts.json
(``benchmarks/gate_prompts.py``) and its ``gate-layers-table`` markers from
gate-layers-*/gate_layers.json (``benchmarks/gate_layers.py``) and its ``name-novelty-table``
markers from name-novelty-*/name_novelty.json (``benchmarks/name_novelty.py``), and its
``subject-routing-table`` markers from subject-routing-*/subject_routing.json
(``benchmarks/subject_routing.py``), so the README's numbers come from the files; run it
when runs land (tests/test_results_docs.py checks it).
"""

from __future__ import annotations

import json
import statistics
from functools import cache
from pathlib import Path

from meft.data.adjacent import real_people_questions
from meft.data.synthetic import ATTRIBUTES

ROOT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "novelty-routing"
README = ROOT / "README.md"
BEGIN, END = "<!-- gate-table -->", "<!-- /gate-table -->"
PROMPTS = ("<!-- gate-prompts-table -->", "<!-- /gate-prompts-table -->")
SUMMARY = ("<!-- gate-summary -->", "<!-- /gate-summary -->")
LAYERS = ("<!-- gate-layers-table -->", "<!-- /gate-layers-table -->")
NAMES = ("<!-- name-novelty-table -->", "<!-- /name-novelty-table -->")
SUBJECT = ("<!-- subject-routing-table -->", "<!-- /subject-routing-table -->")
# the one-commit comparisons the summary averages over seeds (each: one commit, one machine)
COMPARISONS = ("gate-b877771", "gate-8549698")
# the columns of the summary: (run-file field, header)
FIELDS = (("test_em", "test EM"), ("retention", "retention"),
          ("retention_seen_kinds", "seen kinds"), ("retention_adjacent", "adjacent kinds"))
# (label, run files) in the order of the table
SETTINGS = (
    ("no protection", "gate-79233f8/reference/meft_4096@0.003@seed*.json"),
    ("replay", "gate-79233f8/reference/meft_4096+retain@0.003@seed*.json"),
    ("gate 0.01, nothing replayed", "gate-79233f8/gate-0.01-alone/*@seed*.json"),
    ("gate 0.01 with replay", "gate-79233f8/gate-0.01-replay/*@seed*.json"),
    ("gate 0.05, nothing replayed", "gate-79233f8/gate-0.05-alone/*@seed*.json"),
    ("gate 0.01, nothing replayed", "gate-ca15d6c/gate-0.01-alone/*@seed*.json"),
    ("surprise-fitted gate 0.01, nothing replayed",
     "gate-dc52641/surprise4-0.01-alone/*@seed*.json"),
    ("sticky surprise-fitted gate 0.002, nothing replayed",
     "gate-0584679/sticky-surprise4-0.002-alone/*@seed*.json"),
    ("no protection, layers 15-29", "gate-338527a/layers15-reference/*@seed*.json"),
    ("one decision per token at layer 15 (0.01), layers 15-29, nothing replayed",
     "gate-338527a/once-0.01-alone/*@seed*.json"),
    ("no protection, layers 8-29", "gate-338527a/layers8-reference/*@seed*.json"),
    ("one decision per token at layer 8 (0.01), layers 8-29, nothing replayed",
     "gate-338527a/once8-0.01-alone/*@seed*.json"),
    # from b877771: the threshold's tie tolerance, and the contrast
    ("no protection", "gate-b877771/reference/meft_4096@0.003@seed*.json"),
    ("replay", "gate-b877771/reference/meft_4096+retain@0.003@seed*.json"),
    ("gate 0.01, nothing replayed", "gate-b877771/gate-0.01-alone/*@seed*.json"),
    ("gate 0.01 with contrast, nothing replayed",
     "gate-b877771/gate-contrast-0.01-alone/*@seed*.json"),
    ("gate 0.002 with contrast, nothing replayed",
     "gate-b877771/gate-contrast-0.002-alone/*@seed*.json"),
    ("no protection, layers 15-29", "gate-b877771/layers15-reference/*@seed*.json"),
    ("one decision per token at layer 15 (0.01), layers 15-29, nothing replayed",
     "gate-b877771/once-0.01-alone/*@seed*.json"),
    ("one decision per token at layer 15 (0.01) with contrast, layers 15-29, nothing "
     "replayed", "gate-b877771/once-contrast-0.01-alone/*@seed*.json"),
    # from 8549698: subject routing (--retain-subject)
    ("no protection", "gate-8549698/reference/meft_4096@0.003@seed*.json"),
    ("replay", "gate-8549698/reference/meft_4096+retain@0.003@seed*.json"),
    ("subject routing at block 13 with contrast, nothing replayed",
     "gate-8549698/subject13-contrast-alone/*@seed*.json"),
    ("subject routing at block 13, nothing replayed",
     "gate-8549698/subject13-alone/*@seed*.json"),
    ("subject routing at block 13 with contrast, lr 1e-2, nothing replayed",
     "gate-8549698/subject13-contrast-1e-2-alone/*@seed*.json"),
)


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


@cache
def _attribute_of() -> dict[str, str]:
    """The adjacent probe's question -> the attribute it asks (its source ends with it)."""
    return {s.messages[0]["content"]: s.source.rsplit(" ", 1)[1] for s in real_people_questions()}


def _forgotten_by_attribute(run: dict) -> str:  # type: ignore[type-arg]
    """The adjacent questions the run forgot, counted per attribute."""
    forgotten = run.get("forgotten_adjacent")
    if forgotten is None:
        return "–"
    of = _attribute_of()
    return " / ".join(str(sum(of.get(q) == a for q in forgotten)) for a in ATTRIBUTES)


def table() -> str:
    out = ["| setting | directory | seed | test EM | retention | seen kinds | adjacent kinds | "
           "adjacent forgotten (" + " / ".join(ATTRIBUTES) + ") | "
           "Δ general loss | untouched general tokens | exact probe prompts | exact adjacent "
           "prompts |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, pattern in SETTINGS:
        for path in sorted(ROOT.glob(pattern)):
            r = json.loads(path.read_text())
            out.append(f"| {label} | `{path.parent.relative_to(ROOT)}` | {r['seed']} | "
                       f"{pct(r['test_em'])} | {pct(r['retention'])} | "
                       f"{pct(r['retention_seen_kinds'])} | {pct(r.get('retention_adjacent'))} "
                       f"| {_forgotten_by_attribute(r)} | {r['general_loss_delta']:+.3f} | "
                       f"{pct(r.get('untouched_tokens'))} | "
                       f"{pct(r.get('exact_questions'))} | "
                       f"{pct(r.get('exact_questions_adjacent'))} |")
    return "\n".join(out)


def _mean_sd(values: list[float], scale: float = 100.0, fmt: str = ".1f") -> str:
    if not values:
        return "–"
    mean = f"{scale * statistics.fmean(values):{fmt}}"
    return mean if len(values) < 2 else f"{mean} ± {scale * statistics.stdev(values):{fmt}}"


def summary() -> str:
    """Per setting (one directory, one label): the seeds landed and each field's mean ± sample
    standard deviation over them; the settings of COMPARISONS only (compare within one)."""
    out = ["| setting | directory | seeds | " + " | ".join(h for _, h in FIELDS)
           + " | Δ general loss |", "|---|---|---|" + "---:|" * (len(FIELDS) + 1)]
    for label, pattern in SETTINGS:
        runs = [json.loads(p.read_text()) for p in sorted(ROOT.glob(pattern))]
        if not runs or Path(pattern).parts[0] not in COMPARISONS:
            continue
        cells = [_mean_sd([r[f] for r in runs if r.get(f) is not None]) for f, _ in FIELDS]
        loss = _mean_sd([r["general_loss_delta"] for r in runs], 1.0, "+.3f")
        seeds = ",".join(str(r["seed"]) for r in runs)
        out.append(f"| {label} | `{Path(pattern).parent}` | {seeds} | " + " | ".join(cells)
                   + f" | {loss} |")
    return "\n".join(out)


def prompts_table() -> str:
    """Per gate_prompts.json: per prompt set and threshold rule, the prompts left exact, the
    share of their tokens passing, and the three tokens passing most often."""
    out = ["| directory | deciding layer | prompts | threshold | prompts | exact (no token "
           "passes) | tokens passing | passing most often (position from end: token x prompts) |",
           "|---|---:|---|---|---:|---:|---:|---|"]
    for path in sorted(ROOT.glob("gate-prompts-*/gate_prompts.json")):
        r = json.loads(path.read_text())
        for key, v in r["results"].items():
            kind, rule = key.rsplit("_", 1)
            top = ", ".join(f"{pos}: {json.dumps(text)} x{n}" for pos, text, n in
                            v["most_passing"][:3]).replace("|", "\\|")  # in a table cell
            out.append(f"| `{path.parent.name}` | {r['first_layer']} | {kind} | "
                       f"{'1e-3 sd above the quantile' if rule == 'tolerant' else 'bare quantile'}"
                       f" | {v['prompts']} | {pct(v['exact'])} | {pct(v['tokens_passing'])} | "
                       f"{top} |")
    return "\n".join(out)


def layers_table() -> str:
    """Per gate_layers.json (``benchmarks/gate_layers.py``) and share: the pass rates, mean
    over the layers and (answer positions) the share of prompts passing at one layer or more."""
    out = ["| directory | contrast | share | training answers (mean over layers) | training "
           "tokens | test answer position: mean / any layer | adjacent: mean / any layer | "
           "unseen: mean / any layer |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for path in sorted(ROOT.glob("gate-layers-*/gate_layers.json")):
        r = json.loads(path.read_text())
        for share, v in r["results"].items():
            cells = [pct(statistics.fmean(v["train_answer"])),
                     pct(statistics.fmean(v["train_tokens"]))]
            cells += [f"{pct(statistics.fmean(v[f'{k}_last']))} / "
                      f"{pct(v[f'{k}_last_any_layer'])}" for k in ("test", "adjacent", "unseen")]
            out.append(f"| `{path.parent.name}` | {r['contrast'] or 'none'} | {share} | "
                       + " | ".join(cells) + " |")
    return "\n".join(out)


def names_table() -> str:
    """Per name_novelty.json (``benchmarks/name_novelty.py``): per layer, how well the hidden
    state at a name's last token tells held-out invented people from held-out real ones."""
    out = ["| directory | layer | AUC | real names passing at 95% of invented | real names "
           "passing at 1% of the contrast | replay pool tokens at 95% | replay pool prompts at "
           "95% |", "|---|---:|---:|---:|---:|---:|---:|"]
    for path in sorted(ROOT.glob("name-novelty-*/name_novelty.json")):
        for r in json.loads(path.read_text())["layers"]:
            out.append(f"| `{path.parent.name}` | {r['layer']} | {r['auc']:.4f} | "
                       f"{pct(r['adjacent_at_95'])} | {pct(r['adjacent_at_contrast_1pct'])} | "
                       f"{pct(r['background_tokens_at_95'])} | "
                       f"{pct(r['background_prompts_at_95'])} |")
    return "\n".join(out)


def subject_table() -> str:
    """Per subject_routing.json (``benchmarks/subject_routing.py``) and setting: the prompts
    with a routed position, and the training answers and tokens routed."""
    sets = ("test", "other_invented", "adjacent", "unseen", "pool")
    out = ["| directory | deciding layer | surprise above (nats) | background share | "
           + " | ".join(f"{k} prompts routed" for k in sets)
           + " | training answers routed | training tokens routed |",
           "|---|---:|---:|---:|" + "---:|" * (len(sets) + 2)]
    for path in sorted(ROOT.glob("subject-routing-*/subject_routing.json")):
        for key, v in json.loads(path.read_text())["results"].items():
            layer, tau, share = key.split("_")
            out.append(f"| `{path.parent.name}` | {layer[1:]} | {tau[3:]} | {share[5:]} | "
                       + " | ".join(pct(v[k]) for k in sets)
                       + f" | {pct(v['train_answer_routed'])} | {pct(v['train_tokens_routed'])} |")
    return "\n".join(out)


def _between(text: str, markers: tuple[str, str], body: str) -> str:
    head, _, rest = text.partition(markers[0])
    _, _, tail = rest.partition(markers[1])
    return f"{head}{markers[0]}\n{body}\n{markers[1]}{tail}"


def readme() -> str:
    """The README with its table sections as the result files give them."""
    text = _between(README.read_text(), (BEGIN, END), table())
    text = _between(text, SUMMARY, summary())
    text = _between(text, LAYERS, layers_table())
    text = _between(text, NAMES, names_table())
    text = _between(text, SUBJECT, subject_table())
    return _between(text, PROMPTS, prompts_table())


if __name__ == "__main__":
    README.write_text(readme())
    print(table())
