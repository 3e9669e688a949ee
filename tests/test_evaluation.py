"""Evaluation: the exact likelihood with the phase marginalised, importance sampling, the
metrics of a run without a likelihood, and the HTML report opened in headless Chromium."""

import base64
import html
import io
import json
import math
import os
import re
import shutil

import matplotlib.image
import pytest
import torch

from browser import Chromium, chromium_binary
from helpers import REPO, snakemake, system_up, tiny_config
from stagewise.config import Problem
from stagewise.evaluate.importance import ImportanceSampler, likelihood_plan, normalised_weights, summary
from stagewise.evaluate.run import EvaluationInputs, evaluate
from stagewise.simulate.likelihood import log_likelihood, phase_marginalised_log_likelihood
from stagewise.simulate.ringdown import ringdown_polarisations
from test_physics import EXTRINSIC_PRIOR, generator, small_simulator, truth, whitened_data

NARROW_PRIOR = {
    "f0": {"distribution": "uniform", "low": 110.0, "high": 130.0},
    "tau": {"distribution": "loguniform", "low": 0.015, "high": 0.03},
}


def direct_log_likelihood(data, parameters, simulator):
    """-1/2 sum |d - h|^2 - n log(2 pi) with h from the simulator itself, one parameter set at a time."""
    values = []
    for i in range(len(parameters["f0"])):
        point = {name: value[i:i + 1] for name, value in parameters.items()}
        h_plus, h_cross = ringdown_polarisations(point["f0"], point["tau"], simulator.frequencies)
        signal = simulator.whitened_signals(h_plus.to(torch.complex128), h_cross.to(torch.complex128), point)[0]
        residual = data - signal
        values.append(-0.5 * residual.abs().square().sum() - data.numel() * math.log(2 * math.pi))
    return torch.stack(values).double()


def test_log_likelihood_equals_the_residual_form_at_any_phase():
    simulator, parameters = small_simulator(), truth()
    data = whitened_data(simulator, parameters, generator(5))
    points = {name: value.repeat(5) for name, value in parameters.items()}
    points["phase"] = torch.tensor([0.0, 1.0, 2.5, 4.0, 6.0], dtype=torch.float64)
    points["f0"] = torch.tensor([120.0, 121.0, 119.0, 150.0, 120.0], dtype=torch.float64)

    ours = log_likelihood(data, points, simulator, simulator.fiducial_asd)

    assert torch.allclose(ours, direct_log_likelihood(data, points, simulator), rtol=1e-6)


def test_phase_marginalised_likelihood_is_the_mean_likelihood_over_the_phase():
    simulator, parameters = small_simulator(), truth()
    data = whitened_data(simulator, parameters, generator(6))
    phases = torch.linspace(0, 2 * math.pi, 2001, dtype=torch.float64)[:-1]
    grid = {name: value.repeat(len(phases)) for name, value in parameters.items()} | {"phase": phases}

    brute_force = torch.logsumexp(direct_log_likelihood(data, grid, simulator), 0) - math.log(len(phases))
    ours = phase_marginalised_log_likelihood(data, parameters, simulator, simulator.fiducial_asd)

    assert ours.item() == pytest.approx(brute_force.item(), abs=1e-4)


def ringdown_config(inference_parameters, **extrinsic):
    return {
        "data": {"kind": "signals", "simulate": True},
        "inference_parameters": inference_parameters,
        "intrinsic_prior": NARROW_PRIOR,
        "extrinsic_prior": {**EXTRINSIC_PRIOR, "snr": {"distribution": "uniform", "low": 5.0, "high": 20.0},
                            **extrinsic},
    }


@pytest.mark.parametrize("config, expected", [
    (ringdown_config(["f0", "tau", "snr"]), {"phase": "marginalised", "time": 0.0, "snr": "inferred"}),
    (ringdown_config(["f0", "tau", "snr", "phase"]), {"phase": "inferred"}),
    (ringdown_config(["f0", "tau"]), "'snr' is neither inferred nor fixed"),
    (ringdown_config(["f0", "tau", "snr"], time={"distribution": "uniform", "low": -0.01, "high": 0.01}),
     "'time' is neither inferred nor fixed"),
    (ringdown_config(["f0", "tau", "snr"], phase={"distribution": "uniform", "low": 0.0, "high": 1.0}),
     "'phase' is neither inferred nor fixed"),
    (ringdown_config(["f0", "tau", "snr"]) | {"data": {"kind": "signals", "simulate": False}},
     "the event files are the user's own"),
], ids=["default", "phase inferred", "snr free", "time free", "partial phase", "user data"])
def test_likelihood_plan_marginalises_only_a_full_period_phase(config, expected):
    plan, reason = likelihood_plan(Problem.from_settings(config))
    if isinstance(expected, str):
        assert plan is None and expected in reason
    else:
        assert reason is None and expected.items() <= plan.items()


def sample_efficiency_and_evidence(sampler, samples, log_q, data, asd):
    log_w = sampler.log_weights(samples, log_q, data, asd)
    efficiency, log_evidence, error = summary(log_w)
    weights = torch.as_tensor(normalised_weights(log_w))[:, None]
    mean = (weights * samples).sum(0)
    return efficiency, log_evidence, error, mean, (weights * (samples - mean).square()).sum(0).sqrt()


def test_importance_sampling_from_two_proposals_gives_the_same_evidence_and_posterior_mean():
    """The prior itself and a Gaussian around the truth are both valid proposals: the evidence and the
    reweighted mean must agree within their errors, which needs the prior, the proposal density in
    physical units and the likelihood all right."""
    simulator = small_simulator()
    problem = Problem.from_settings(ringdown_config(["f0", "tau", "snr"]))
    sampler = ImportanceSampler(problem, likelihood_plan(problem)[0], simulator)
    parameters = truth() | {"snr": torch.tensor([10.0], dtype=torch.float64)}
    data = whitened_data(simulator, parameters, generator(8))
    draws = torch.Generator().manual_seed(9)
    count = 20000

    prior_samples = torch.stack([sampler.priors[n].sample(count, draws) for n in sampler.names], dim=1)
    prior_log_q = sum(sampler.priors[n].log_prob(prior_samples[:, i]) for i, n in enumerate(sampler.names))
    by_prior = sample_efficiency_and_evidence(sampler, prior_samples, prior_log_q, data, simulator.fiducial_asd)

    gaussian = torch.distributions.Normal(by_prior[3], 1.5 * by_prior[4])
    gaussian_samples = gaussian.sample((count,))
    gaussian_log_q = gaussian.log_prob(gaussian_samples).sum(1)
    by_gaussian = sample_efficiency_and_evidence(sampler, gaussian_samples, gaussian_log_q, data,
                                                 simulator.fiducial_asd)

    assert by_gaussian[0] > 2 * by_prior[0]  # the closer proposal is the more efficient
    assert abs(by_prior[1] - by_gaussian[1]) < 4 * math.hypot(by_prior[2], by_gaussian[2])
    assert torch.allclose(by_prior[3], by_gaussian[3], rtol=0.02)
    assert torch.allclose(by_prior[4], by_gaussian[4], rtol=0.2)


def test_sample_efficiency_is_one_for_equal_weights_and_one_over_n_for_a_single_weight():
    equal = summary(torch.full((100,), -3.0, dtype=torch.float64))
    single = summary(torch.tensor([0.0] + [-math.inf] * 99, dtype=torch.float64))

    assert equal[0] == pytest.approx(1.0) and equal[1] == pytest.approx(-3.0) and equal[2] < 1e-6
    assert single[0] == pytest.approx(0.01) and single[1] == pytest.approx(-math.log(100))


def tiny_inputs(workdir):
    run = workdir / "results" / "tiny"
    return EvaluationInputs(
        model=run / "stage_1" / "model_stage_1.pt",
        histories={stage: run / stage / "history.csv" for stage in ("stage_0", "stage_1")},
        trafo=run / "trafo.h5", test_files=[run / "data" / "test_00.h5"], fiducial_asd=run / "data" / "fiducial_asd.h5",
        asd_set=run / "data" / "asd_set.h5", svd={d: run / f"svd_{d}.h5" for d in ("H1", "L1")}, compare={},
    )


@pytest.mark.slow
def test_evaluation_without_a_likelihood_says_why_importance_sampling_was_skipped(tiny_run, tmp_path):
    workdir = tiny_run[0]
    config = tiny_config()
    config["data"]["simulate"] = False

    metrics = evaluate(config, config["local"], tiny_inputs(workdir), tmp_path)

    assert "stagewise knows no likelihood" in metrics["importance_sampling"]["skipped"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert (tmp_path / "importance_sampling.csv").read_text().startswith("injection,efficiency,")
    assert set(metrics["pp_ks_pvalue"]) == {"f0", "tau", "snr"}
    assert (tmp_path / "corner.png").stat().st_size > 0
    assert "network_vs_exact" not in metrics  # nothing exact to compare with; the plots say so
    assert (tmp_path / "network_vs_exact.png").stat().st_size > 0


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium, installed with apt when missing (as root, like CI; see conftest.py)."""
    if chromium_binary() is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip("chromium is not installed and this machine has no root or no apt-get to install it")
    system_up("chromium")
    return chromium_binary()


IMAGE_SIZES = """(async () => {
  const sizes = {};
  for (const [path, entry] of Object.entries(results)) {
    if (!entry.mime_type.startsWith("image/")) continue;
    const image = new Image();
    image.src = entry.data_uri;
    try { await image.decode(); sizes[path] = [image.naturalWidth, image.naturalHeight]; }
    catch (error) { sizes[path] = String(error); }
  }
  return sizes;
})()"""


REPORT_DATA = """Object.fromEntries(Object.entries(results).map(([path, entry]) => [path, {
  caption: entry.caption,
  data: entry.mime_type.startsWith("text/html")
    ? new TextDecoder().decode(Uint8Array.from(atob(entry.data_uri.split("base64,")[1]), c => c.charCodeAt(0)))
    : null,
}]))"""


def visible_text(html_text):
    """The text a reader sees of an HTML fragment: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", html_text)).split())


def caption_text(name):
    """The text of workflow/report/<name>.rst as rendered: ``literal`` marks dropped, whitespace collapsed."""
    return " ".join((REPO / "workflow/report" / f"{name}.rst").read_text().replace("``", "").split())


def html_table_rows(html_text):
    """{row header: cell} of the first table in an HTML document (pandas' to_html layout)."""
    table = html_text.split("</table>")[0]
    return {html.unescape(key): html.unescape(value)
            for key, value in re.findall(r"<tr>\s*<th>([^<]*)</th>\s*<td>([^<]*)</td>\s*</tr>", table)}


def flat_metrics(metrics, prefix=""):
    """metrics.json as {dotted key: value}, as the report's table names its rows."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat |= flat_metrics(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.slow
def test_report_opens_in_headless_chromium_with_every_figure_its_caption_and_the_metrics(tiny_run, chromium,
                                                                                          tmp_path):
    workdir = tiny_run[0]
    snakemake(workdir, "--report", "results/tiny/report.html")
    browser = Chromium(tmp_path / "profile")
    try:
        page = browser.open_page((workdir / "results/tiny/report.html").as_uri())
        browser.wait_for(page, "document.readyState === 'complete' && typeof results !== 'undefined'")
        browser.wait_for(page, "document.querySelector('#app').innerText.includes('Inference')")
        sizes = browser.evaluate(page, IMAGE_SIZES)
        entries = browser.evaluate(page, REPORT_DATA)
        screenshot = base64.b64decode(browser.send("Page.captureScreenshot", page)["data"])
    finally:
        browser.close()

    evaluation, inference = "results/tiny/evaluation", "results/tiny/inference/simulated"
    plots = ("loss_curves", "pp_plot", "corner", "pulls", "svd_mismatch", "label_distributions", "network_vs_exact",
             "network_vs_exact_worst")
    assert set(sizes) == {f"{evaluation}/{plot}.png" for plot in plots} | {f"{inference}/corner.png"}
    for path, size in sizes.items():
        assert isinstance(size, list) and min(size) > 100, (path, size)
    assert set(entries) == {f"{evaluation}/{plot}.png" for plot in plots} | {f"{evaluation}/metrics.html"} | {
        f"{inference}/corner.png", f"{inference}/summary.csv"}
    captions = {f"{evaluation}/{name}.{'html' if name == 'metrics' else 'png'}": caption_text(name)
                for name in (*plots, "metrics")}
    for path, name in ((f"{inference}/corner.png", "infer_corner"), (f"{inference}/summary.csv", "summary")):
        captions[path] = caption_text(name).replace("{{ snakemake.wildcards.set }}", "simulated")
    for path, caption in captions.items():
        assert visible_text(entries[path]["caption"]) == caption, path

    table = html_table_rows(entries[f"{evaluation}/metrics.html"]["data"])
    metrics = flat_metrics(json.loads((workdir / evaluation / "metrics.json").read_text()))
    assert set(table) == set(metrics)
    for key, value in metrics.items():
        if isinstance(value, float):
            assert float(table[key]) == pytest.approx(value, rel=1e-5, abs=1e-300), (key, table[key], value)
        else:
            assert table[key] == str(value), (key, table[key], value)
    pixels = matplotlib.image.imread(io.BytesIO(screenshot))
    assert pixels.std() > 0.01  # the page rendered something, not a blank screen
