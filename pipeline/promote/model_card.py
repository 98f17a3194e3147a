"""Model cards and descriptions for the registry (markdown: the MLflow UI renders it).

A promoted version carries its card twice: as the version's description (what the registry page shows) and as a
markdown artifact (with the subgroup figure) on the promotion run and on the version's training run. The card
says what the model is for (an aid, not a diagnosis), what it was trained and tested on (the dataset digest),
how well it does with confidence intervals beside the majority baseline, per subgroup (view, sex, age), at
which threshold, and what is known not to work; the internal test split, the shift battery (validation AUC
under simulated acquisition shifts, `val_auc_shift_*` on the training run) and external sets side by side with
the majority baseline; the calibration; and the promotion decision with its rule. Pure text and figures from
`pipeline.evaluate.plots`: no MLflow, no TensorFlow.
"""

from __future__ import annotations

import math

from pipeline.artifact import tag_keys
from pipeline.evaluate import plots
from pipeline.evaluate.metrics import fmt as _f
from pipeline.evaluate.metrics import fmt_difference
from pipeline.evaluate.metrics import fmt_metric_ci as _ci


def _data_lines(manifest: dict, digest: str) -> list[str]:
    source = manifest.get("source", {})
    splits = manifest.get("splits", {})
    rows = [f"| {name} | {s.get('count', 0)} | {s.get('positives', 0)} |" for name, s in splits.items()]
    return [
        f"- Dataset digest: `{digest}` (sha256 over the TFRecord shards: the dataset's identity).",
        f"- Source: {source.get('kind', 'unknown')} inputs ({source.get('n_inputs', '?')} files), "
        f"converted to {manifest.get('image_size', '?')} x {manifest.get('image_size', '?')} px grey images; "
        f"patient-level stratified split (seed {manifest.get('seed', '?')}); "
        f"{len(manifest.get('rejected', []))} unreadable inputs left out.",
        "",
        "| split | images | positives |",
        "| --- | ---: | ---: |",
        *rows,
    ]


def _subgroup_table(subgroups: list[dict]) -> list[str]:
    lines = ["| group | value | n | positives | AUC [95% CI] | sensitivity | specificity | accuracy | baseline |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in subgroups:
        lines.append(f"| {r['group']} | {r['value'] or '(blank)'} | {r['n']} | {r['positives']} | {_ci(r, 'auc')} "
                     f"| {_f(r['sensitivity'])} | {_f(r['specificity'])} | {_f(r['accuracy'])} "
                     f"| {_f(r['majority_baseline_accuracy'])} |")
    return lines


def subgroup_figure(subgroups: list[dict]):
    """Test AUC with its 95% CI per subgroup (view position, sex, age band): one row each."""
    results = {f"{r['group']}={r['value'] or '(blank)'} (n={r['n']})": r for r in subgroups}
    fig = plots.plot_auc_comparison(results)
    fig.axes[0].set_title("Test AUC by subgroup (same threshold)")
    return fig


def render(*, model: str, version: str, metrics: dict, subgroups: list[dict], threshold: float,
           threshold_source: str, manifest: dict, digest: str, data_dir: str, run_id: str, run_name: str | None,
           lineage: dict, comparison: dict | None, champion: str | None, promoted_at: str,
           decision=None) -> str:
    """The model card of a promoted version, as markdown."""
    prev = metrics.get("prevalence", math.nan)
    majority = "everyone negative" if not (isinstance(prev, float) and prev > 0.5) else "everyone positive"
    lines = [
        f"# Model card: {model} version {version}",
        "",
        f"Promoted to `champion` on {promoted_at} by `pneumo promote` (evaluation gate on the locked test split).",
        f"Load it as `models:/{model}@champion` or `models:/{model}/{version}`.",
        "",
        "## Intended use",
        "- An **aid** that flags frontal chest radiographs (CR/DX, PA or AP) for possible pneumonia, for "
        "research, teaching and triage support. **It is not a diagnosis** and must not replace a clinician's "
        "reading; every flag needs a qualified reader's review.",
        "- Out of scope: other body parts or modalities (CT, MR), lateral views, multi-frame or colour images, "
        "children unless the training data held them. `pneumo predict` warns on a header that is not a chest "
        "radiograph and does not predict it unless forced.",
        "",
        "## Training data",
        *_data_lines(manifest, digest),
        "",
        "## Lineage",
        f"- Training run: `{run_id}`" + (f" ({run_name})" if run_name else ""),
        *[f"- {k}: {v}" for k, v in lineage.items() if v not in (None, "")],
        "",
        f"## Test metrics (locked test split of `{data_dir}`)",
        "| metric | value |",
        "| --- | --- |",
        f"| images / patients | {metrics.get('n')} / {metrics.get('patients', metrics.get('n'))} |",
        f"| ROC AUC [95% patient-level bootstrap CI] | {_ci(metrics, 'auc')} |",
        f"| AUC-PR (chance = prevalence {_f(prev)}) | {_f(metrics.get('auc_pr'))} |",
        f"| Accuracy [95% Wilson CI, patient-clustered] | {_ci(metrics, 'accuracy')} |",
        f"| Majority baseline ({majority}) | {_f(metrics.get('majority_baseline_accuracy'))} |",
        f"| Accuracy minus baseline | {_f(metrics.get('accuracy_minus_baseline'))} |",
        f"| Sensitivity | {_f(metrics.get('sensitivity'))} |",
        f"| Specificity | {_f(metrics.get('specificity'))} |",
        f"| Precision (PPV at this prevalence) | {_f(metrics.get('precision'))} |",
        f"| Brier score | {_f(metrics.get('brier'), 4)} |",
        f"| n / positives | {metrics.get('n')} / {metrics.get('positives')} |",
        "",
        f"**Threshold:** {threshold:.4f}, {threshold_source}; a case is flagged when its probability is >= "
        "the threshold. It was never tuned on the test split.",
        "",
    ]
    if decision is not None:
        lines += _evidence_lines(metrics, decision)
    if comparison and champion:
        lines += [
            f"## Gate: compared with the previous champion (version {champion})",
            f"- Test AUC {_f(comparison['auc_a'])} vs {_f(comparison['auc_b'])}: {fmt_difference(comparison)}.",
            f"- {significance(comparison)}",
            "",
        ]
    if decision is not None:
        lines += ["## Decision", f"- Rule: {decision.rule.describe()}.",
                  *[f"- {'PASS' if ok else 'FAIL'} {name}: {words}" for name, ok, words in decision.checks],
                  f"- Outcome: **{decision.outcome}**.", ""]
    lines += [
        "## Subgroups (test split, same threshold)",
        "A chest X-ray model can learn the view (AP films come from sicker, bedside patients) or the sex instead "
        "of the disease: compare AUCs and baselines side by side (figure `model_card/subgroups.png`).",
        "",
        *_subgroup_table(subgroups),
        "",
        "## Known limits",
        f"- Small test split ({metrics.get('n')} images of {metrics.get('patients', '?')} patients): read the "
        "confidence intervals, not the point values.",
        "- Labels are radiologists' reads of the images (RSNA-style boxes), not confirmed diagnoses; some are noisy.",
        f"- Images are downsampled to {manifest.get('image_size', '?')} px: small or faint opacities can be lost.",
        "- One data source: performance on other hospitals, scanners, populations and children is unknown.",
        "- The threshold fixes sensitivity/specificity on the validation split; positive predictive value "
        "changes with the prevalence where it is used.",
        "- Data made by `pneumo synth` are synthetic: a model trained on them says nothing about real patients.",
        "- The out-of-scope guard reads the DICOM header only; a mislabelled header defeats it.",
    ]
    return "\n".join(lines) + "\n"


def _evidence_lines(metrics: dict, d) -> list[str]:
    """Internal test, shift battery and external sets side by side, with the baseline and the calibration."""
    rows = [f"| internal test (`{d.data_dir}`) | {metrics.get('n')} / {metrics.get('patients')} | {_ci(metrics, 'auc')} "
            f"| {_ci(metrics, 'accuracy')} | {_f(metrics.get('majority_baseline_accuracy'))} "
            f"| {_f(metrics.get('sensitivity'))} / {_f(metrics.get('specificity'))} |"]
    run_metrics = getattr(d.candidate, "run_metrics", {}) or {}
    shifts = sorted((k, v) for k, v in run_metrics.items() if k.startswith("val_auc_shift_"))
    for key, value in shifts:
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        rows.append(f"| shift battery: {key.removeprefix('val_auc_shift_')} (validation) | | {_f(value)} | | | |")
    for x in d.externals:
        m = x.candidate.metrics
        rows.append(f"| external `{x.name}` (`{x.data_dir}`, all splits) | {m.get('n')} / {m.get('patients')} "
                    f"| {_ci(m, 'auc')} | {_ci(m, 'accuracy')} | {_f(m.get('majority_baseline_accuracy'))} "
                    f"| {_f(m.get('sensitivity'))} / {_f(m.get('specificity'))} |")
    temperature = run_metrics.get("temperature") or d.candidate.tags.get(tag_keys.TEMPERATURE)
    heldout = run_metrics.get("val_ece_heldout")
    evidence = (f"; expected calibration error {_f(float(heldout), 4)} on validation patients the temperature was "
                "not fitted on (two-fold cross-fit)" if heldout is not None else
                "; no held-out calibration evidence recorded for this version")
    calib = (f"temperature {_f(float(temperature), 3)} fitted on validation{evidence}"
             if temperature not in (None, "") else "no temperature recorded: probabilities are the network's own")
    lines = ["## Evidence side by side",
             "| data | images / patients | AUC [95% CI] | accuracy [95% CI] | majority baseline | sens / spec |",
             "| --- | ---: | --- | --- | ---: | --- |", *rows, "",
             f"- Calibration: {calib}; Brier score on the internal test split {_f(metrics.get('brier'), 4)}.",
             "- Shift battery rows are validation AUCs under simulated shifts, logged by training (absent when "
             "the training run did not compute them)." if shifts else
             "- Shift battery: not recorded for this version's training run.", ""]
    return lines


def significance(comparison: dict) -> str:
    """Whether an AUC difference is real, in words (5% level, both tests must agree to call it real)."""
    p_boot, p_delong = comparison.get("p_value"), comparison.get("delong_p")  # both patient-clustered
    ps = [p for p in (p_boot, p_delong) if p is not None and math.isfinite(p)]
    if not ps:
        return "No significance test possible (one class in the test split)."
    if max(ps) < 0.05:
        word = "better" if comparison["diff"] > 0 else "worse"
        return f"The candidate is significantly {word} at the 5% level (both tests agree)."
    return ("The difference is not significant at the 5% level: on this test split the two models cannot be "
            "told apart.")


def version_summary(version: str, tags: dict, metric: str, value: float, run_name: str | None) -> str:
    """A one-paragraph description for a registered version that has none (what it is, where it came from)."""
    parts = []
    if tags.get(tag_keys.ENSEMBLE_MEMBERS):  # pipeline.promote.ensemble: one model averaging several versions
        parts.append(f"Ensemble (mean probability) of versions {tags[tag_keys.ENSEMBLE_MEMBERS]} of study "
                     f"`{tags.get(tag_keys.STUDY, '?')}`.")
    elif tags.get(tag_keys.STUDY):
        parts.append(f"Trial {tags.get(tag_keys.TRIAL_NUMBER, '?')} of Optuna study `{tags[tag_keys.STUDY]}`.")
    elif run_name:
        parts.append(f"Trained by run `{run_name}`.")
    parts.append(f"Validation {metric}: {_f(value)}.")
    if tags.get(tag_keys.THRESHOLD):
        parts.append(f"Threshold (chosen on validation): {_f(float(tags[tag_keys.THRESHOLD]), 4)}.")
    if tags.get(tag_keys.DATASET_DIGEST):
        parts.append(f"Dataset `{tags[tag_keys.DATASET_DIGEST][:12]}`.")
    parts.append("Not promoted: see the `champion` alias for the model in use.")
    return " ".join(parts)


def model_description(model: str, champion: str, metrics: dict, digest: str, promoted_at: str) -> str:
    """The registered model's description: what it is, how to load it, and the current champion."""
    return (
        f"Pneumonia classifier for frontal chest radiographs: a Keras CNN trained by `pneumo` on RSNA-layout "
        f"DICOMs. **An aid, not a diagnosis.**\n\n"
        f"- Serve `models:/{model}@champion`; the alias `previous-champion` marks the version it replaced "
        "(`replaced_at` / `replaced_by` tags keep the history).\n"
        f"- Current champion: **version {champion}**, test AUC {_ci(metrics, 'auc')} "
        f"(majority baseline accuracy {_f(metrics.get('majority_baseline_accuracy'))}) on dataset "
        f"`{digest[:12]}`, promoted {promoted_at} by the evaluation gate of `pneumo promote`.\n"
        "- Each version's tags: study, trial_number, val_auc, dataset_digest, threshold; a promoted version also "
        "carries test_* metrics and its model card as its description."
    )
