"""Patient-clustered statistics: intervals that respect patients with several images.

Simulated data with a known answer: patients carry one label and a patient effect u ~ N(0, s_u) shared by their
images; each image adds its own noise e ~ N(0, s_e). An image of a positive patient scores d + u + e, so the
AUC over pairs of images of different patients is Phi(d / sqrt(2 (s_u^2 + s_e^2))). Images of one patient are
correlated, so resampling images (or DeLong per image) gives intervals too narrow; resampling patients and
Obuchowski's clustered DeLong do not.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

import pipeline.evaluate.metrics as evaluation_metrics

D, S_U, S_E = 1.0, 1.0, 0.5
TRUE_AUC = NormalDist().cdf(D / math.sqrt(2 * (S_U**2 + S_E**2)))


def clustered(k: int, images: int, rng, prevalence: float = 0.4):
    """k patients with `images` images each -> (labels, scores, patient ids)."""
    y_pat = (rng.random(k) < prevalence).astype(int)
    u = rng.normal(0, S_U, k)
    pid = np.repeat(np.arange(k), images)
    y = y_pat[pid]
    score = D * y + u[pid] + rng.normal(0, S_E, k * images)
    return y, 1 / (1 + np.exp(-score)), pid


def test_duplicated_images_do_not_narrow_the_clustered_intervals():
    """Each case copied three times is no new evidence: clustered DeLong's SE equals the original one exactly
    (Obuchowski's form reduces to DeLong's), the cluster bootstrap's interval matches; naive ones shrink."""
    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.3).astype(int)
    a, b = rng.normal(size=300) + 1.2 * y, rng.normal(size=300) + 0.8 * y
    pa, pb = 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-b))
    base = evaluation_metrics.delong_test(y, pa, pb)
    triple = np.tile(np.arange(300), 3)
    y3, pa3, pb3 = y[triple], pa[triple], pb[triple]
    clus = evaluation_metrics.delong_test(y3, pa3, pb3, clusters=triple)
    naive = evaluation_metrics.delong_test(y3, pa3, pb3)
    assert clus["diff"] == pytest.approx(base["diff"], abs=1e-12)
    assert clus["se"] == pytest.approx(base["se"], rel=1e-9)
    assert naive["se"] == pytest.approx(base["se"] / math.sqrt(3), rel=0.02)
    width = np.subtract(*evaluation_metrics.bootstrap_auc_ci(y, pa, n=2000)[::-1])
    width_c = np.subtract(*evaluation_metrics.bootstrap_auc_ci(y3, pa3, n=2000, clusters=triple)[::-1])
    width_n = np.subtract(*evaluation_metrics.bootstrap_auc_ci(y3, pa3, n=2000)[::-1])
    assert width_c == pytest.approx(width, rel=0.1) and width_n < 0.7 * width


def test_singleton_clusters_equal_the_unclustered_statistics():
    rng = np.random.default_rng(4)
    y = (rng.random(400) < 0.25).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=400) + y)))
    q = 1 / (1 + np.exp(-(rng.normal(size=400) + 0.5 * y)))
    ids = [f"patient-{i}" for i in range(400)]
    assert evaluation_metrics.bootstrap_auc_ci(y, p, n=300, clusters=ids) == evaluation_metrics.bootstrap_auc_ci(y, p, n=300)
    assert evaluation_metrics.delong_test(y, p, q, clusters=ids) == pytest.approx(evaluation_metrics.delong_test(y, p, q))
    assert evaluation_metrics.compute_metrics(y, p, 0.5, n_boot=100, clusters=ids) == evaluation_metrics.compute_metrics(y, p, 0.5, n_boot=100)


def test_clustered_interval_is_wider_than_naive_on_repeated_patients():
    rng = np.random.default_rng(5)
    y, p, pid = clustered(120, 5, rng)
    m_c = evaluation_metrics.compute_metrics(y, p, 0.5, n_boot=1000, clusters=pid)
    m_n = evaluation_metrics.compute_metrics(y, p, 0.5, n_boot=1000)
    assert m_c["n"] == 600 and m_c["patients"] == 120 and m_n["patients"] == 600
    width = lambda m, k: m[f"{k}_ci_high"] - m[f"{k}_ci_low"]  # noqa: E731
    assert width(m_c, "auc") > 1.5 * width(m_n, "auc")
    assert width(m_c, "accuracy") > 1.3 * width(m_n, "accuracy")


def test_clustered_delong_has_nominal_coverage_and_naive_does_not():
    """2,000 simulated studies of 80 patients x 4 images: the clustered 95% interval of the AUC covers the true
    AUC 95% of the time (binomial SE 0.5%: the bound [0.93, 0.97] is about 4 SEs wide each side); the per-image
    interval covers far less."""
    rng = np.random.default_rng(6)
    z = NormalDist().inv_cdf(0.975)
    hit_c = hit_n = 0
    sims = 2000
    for _ in range(sims):
        y, p, pid = clustered(80, 4, rng)
        for clusters, counter in ((pid, "c"), (None, "n")):
            aucs, cov = evaluation_metrics.auc_covariance(y, [p], clusters)
            covered = abs(aucs[0] - TRUE_AUC) <= z * math.sqrt(cov[0, 0])
            if counter == "c":
                hit_c += covered
            else:
                hit_n += covered
    assert 0.93 <= hit_c / sims <= 0.97, hit_c / sims
    assert hit_n / sims < 0.85, hit_n / sims


def test_cluster_bootstrap_has_nominal_coverage():
    """400 simulated studies (binomial SE 1.1%), 300 patient resamples each, vectorised: 5 s here."""
    rng = np.random.default_rng(7)
    sims, hits = 400, 0
    for s in range(sims):
        y, p, pid = clustered(100, 3, rng)
        low, high = evaluation_metrics.bootstrap_auc_ci(y, p, n=300, seed=s, clusters=pid)
        hits += low <= TRUE_AUC <= high
    assert 0.91 <= hits / sims <= 0.98, hits / sims


def test_paired_difference_is_clustered():
    rng = np.random.default_rng(8)
    y, p, pid = clustered(100, 4, rng)
    # A second model whose extra error is per patient (it misreads a patient's anatomy on every image).
    q = 1 / (1 + np.exp(-(np.log(p / (1 - p)) + rng.normal(0, 1.0, 100)[pid] + rng.normal(0, 0.2, p.size))))
    naive = evaluation_metrics.paired_auc_difference(y, p, q, n=1000)
    clus = evaluation_metrics.paired_auc_difference(y, p, q, n=1000, clusters=pid)
    assert clus["diff"] == naive["diff"]
    assert clus["ci_high"] - clus["ci_low"] > 1.2 * (naive["ci_high"] - naive["ci_low"])
    d_c, d_n = evaluation_metrics.delong_test(y, p, q, clusters=pid), evaluation_metrics.delong_test(y, p, q)
    assert d_c["se"] > 1.2 * d_n["se"]
    assert d_c["se"] == pytest.approx(clus["se"], rel=0.2)  # clustered DeLong vs the cluster bootstrap


def test_kermany_clustered_intervals_are_wider(tmp_path):
    """The real Kermany training folder, split by patient with the file-name rule of experiments/kermany.toml:
    patients there have several images, and a patient's images look alike. A simple real score (the image's
    mean grey level in the lung field) shows it: the patient-clustered AUC interval is wider than the image one."""
    from tests.conftest import shared_data

    src = shared_data("kermany-224", "train")
    from pipeline.data.convert import convert_image_dir
    from pipeline.data.tfdata import eval_dataset

    out = tmp_path / "kermany-32"
    convert_image_dir(src, out, patient_regex=r"^(person\d+|NORMAL2-IM-\d+|IM-\d+)", image_size=32, workers=2,
                      progress=False)
    ys, scores, pids = [], [], []
    for split in ("train", "val", "test"):
        for features, labels in eval_dataset(out, split, 512, with_info=True):
            img = features["image"].numpy().astype(np.float64)
            scores.append(img[:, 8:24, 4:28, 0].mean(axis=(1, 2)) / 255.0)
            ys.append(labels.numpy().astype(int))
            pids += [v.decode() for v in features["patient_id"].numpy()]
    y, p = np.concatenate(ys), np.concatenate(scores)
    assert len(set(pids)) < 0.7 * y.size  # several images per patient
    m_c = evaluation_metrics.compute_metrics(y, p, float(np.median(p)), n_boot=1000, clusters=pids)
    m_n = evaluation_metrics.compute_metrics(y, p, float(np.median(p)), n_boot=1000)
    assert m_c["auc"] == m_n["auc"] and m_c["patients"] == len(set(pids))
    assert (m_c["auc_ci_high"] - m_c["auc_ci_low"]) > 1.1 * (m_n["auc_ci_high"] - m_n["auc_ci_low"])
    _, cov_c = evaluation_metrics.auc_covariance(y, [p], pids)
    _, cov_n = evaluation_metrics.auc_covariance(y, [p])
    assert cov_c[0, 0] > 1.2 * cov_n[0, 0]


def test_clustered_delong_with_patients_whose_images_carry_different_labels():
    """A patient's images need not share a label (one lung read positive, a follow-up negative): Obuchowski's
    form then puts one patient's placement values on both sides (V10 and V01 of one cluster, the S11 term). Over
    600 simulated studies its SE matches the empirical spread of the AUC, paired and single, as the patient
    bootstrap's does; the per-image DeLong understates it."""
    rng = np.random.default_rng(12)

    def study():
        k, images = 80, 3
        pid = np.repeat(np.arange(k), images)
        risk = rng.random(k)  # each image positive with its patient's own probability: mixed labels
        y = (rng.random(k * images) < risk[pid]).astype(int)
        u = rng.normal(0, S_U, k)[pid]
        a = D * y + u + rng.normal(0, S_E, y.size)
        b = D * y + u + rng.normal(0, 2 * S_E, y.size) + rng.normal(0, 0.7, k)[pid]  # a second, weaker model
        return y, a, b, pid

    y, a, b, pid = study()
    mixed = [p for p in range(80) if 0 < y[pid == p].sum() < 3]
    assert len(mixed) > 30  # most patients have both labels
    aucs, diffs, se_single, se_paired, se_naive = [], [], [], [], []
    for _ in range(600):
        y, a, b, pid = study()
        (auc_a, auc_b), cov = evaluation_metrics.auc_covariance(y, [a, b], pid)
        aucs.append(auc_a)
        diffs.append(auc_a - auc_b)
        se_single.append(math.sqrt(cov[0, 0]))
        se_paired.append(evaluation_metrics.delong_test(y, a, b, clusters=pid)["se"])
        se_naive.append(math.sqrt(evaluation_metrics.auc_covariance(y, [a], None)[1][0, 0]))
    # the SD of 600 draws is known to about 3% (1 / sqrt(2 * 600)): 10% is a 3-sigma band
    assert np.mean(se_single) == pytest.approx(np.std(aucs), rel=0.1)
    assert np.mean(se_paired) == pytest.approx(np.std(diffs), rel=0.1)
    assert np.mean(se_naive) < 0.85 * np.std(aucs)
    boot = evaluation_metrics.paired_auc_difference(y, a, b, n=2000, clusters=pid)
    assert boot["se"] == pytest.approx(se_paired[-1], rel=0.15)  # one study: DeLong vs the patient bootstrap
