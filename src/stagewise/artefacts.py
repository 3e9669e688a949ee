"""Describe any artefact of a run as text: what `stagewise ls` prints."""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from . import layouts
from .training import checkpoints


class UnknownArtefact(ValueError):
    """A file that is not an artefact stagewise knows."""


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100).rstrip()


def _section(title: str, body: object) -> str:
    return f"{title}:\n" + "\n".join("  " + line for line in str(body).splitlines())


def _provenance(attrs: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in attrs.items() if k.startswith(("version_", "git_")) or k in ("host", "created")}


def describe_model(path: str | Path) -> str:
    """A checkpoint or stage model (.pt), or a Keras stage model (.keras, which imports TensorFlow)."""
    if Path(path).suffix == ".keras":
        from .models.regression import load_regression_model

        state = load_regression_model(path).info
    else:
        state = checkpoints.load(path)
    partial = state.get("partial_epoch")
    planned = state.get("planned_stages") or {}
    progress = {
        "stage": state["stage"],
        "epochs completed": state["epoch"],
        "epochs planned": planned.get(state["stage"], {}).get("epochs", "unknown"),
        "inside epoch": f"step {partial['batches']['step']} of epoch {state['epoch'] + 1}" if partial else "no",
        "fingerprint": state["fingerprint"],
        "inference bundle": "yes (`stagewise infer` needs no other file)" if state.get("inference") else "no",
    }
    gnpe = (state.get("inference") or {}).get("gnpe")
    if gnpe:
        progress["gnpe"] = f"kernel {gnpe['kernel']} s, with its init network (the time alone)"
    history = state.get("history", [])
    last = {k: round(v, 6) if isinstance(v, float) else v for k, v in history[-1].items()} if history else "none"
    parts = [
        _section("progress", _yaml(progress)),
        _section("last epoch", _yaml(last)),
        _section("planned stages", _yaml(planned)),
        _section("settings", _yaml(state["settings"])),
        _section("architecture", _yaml(state["architecture"])),
        _section("provenance", _yaml(state["provenance"])),
    ]
    return "\n".join(parts)


def _describe_h5(path: str | Path, f: h5py.File) -> str:
    layout = f.attrs.get(layouts.ATTRIBUTE)
    parts = []
    if layout == layouts.EVENTS:
        n = next(iter(f["data"].values())).shape[0]
        labels: dict[str, Any] = {k: f"min {d[()].min():.6g}, max {d[()].max():.6g}" for k, d in f["labels"].items()}
        data = {k: f"{d.dtype} {d.shape}" for k, d in f["data"].items()}
        parts.append(_section("event file", _yaml({"kind": str(f.attrs.get("kind")), "events": n})))
        parts.append(_section("labels", _yaml(labels)))
        parts.append(_section("data", _yaml(data)))
        if "frequencies" in f:
            freqs = f["frequencies"][()]
            parts.append(_section("frequencies", f"{len(freqs)} bins, {freqs[0]:g} to {freqs[-1]:g} Hz"))
    elif layout == layouts.ASD:
        freqs = f["frequencies"][()]
        asds = {k: f"{d.shape[0]} ASD(s)" for k, d in f["asds"].items()}
        parts.append(_section("ASD file", _yaml(asds)))
        parts.append(_section("frequencies", f"{len(freqs)} bins, {freqs[0]:g} to {freqs[-1]:g} Hz"))
    elif layout == layouts.TRAFO:
        names = [n.decode() if isinstance(n, bytes) else n for n in f["labels/names"][()]]
        labels = {n: {"mean": float(m), "std": float(s), "log": bool(g)}
                  for n, m, s, g in zip(names, f["labels/mean"][()], f["labels/std"][()], f["labels/log"][()],
                                        strict=True)}
        std = f["inputs/std"][()]
        parts.append(_section("trafo: labels", _yaml(labels)))
        parts.append(_section("trafo: inputs", f"shape {std.shape}, std from {std.min():.4g} to {std.max():.4g}"))
    elif layout == layouts.SVD:
        basis = f["basis"]
        table = {k: f["mismatch"][k][()] for k in f["mismatch"]}
        header = ["size", "mean", "max"] + sorted(k for k in table if k.startswith("p"))
        rows = ["  ".join(f"{h:>10}" for h in header)]
        for i in range(len(table["size"])):
            rows.append("  ".join(f"{table[h][i]:>10.3g}" for h in header))
        svd = {"detector": str(f.attrs.get("detector")), "basis": list(basis.shape)}
        parts.append(_section("SVD basis", _yaml(svd)))
        parts.append(_section("mismatch by basis size", "\n".join(rows)))
    elif layout == layouts.OBSERVED:
        observed: dict[str, Any] = {"kind": str(f.attrs.get("kind")), "events": int(f["event_id"].shape[0])}
        if "strain" in f:
            freqs = f["frequencies"][()]
            observed |= {"detectors": list(f["strain"]), "frequencies": f"{len(freqs)} bins, {freqs[0]:g} to "
                                                                        f"{freqs[-1]:g} Hz"}
        else:
            observed["inputs"] = f"{f['data/inputs'].dtype} {f['data/inputs'].shape}"
        observed["labels"] = list(f.get("labels", {}))
        parts.append(_section("observed-data file", _yaml(observed)))
    elif layout == layouts.POSTERIOR:
        posterior: dict[str, Any] = {"model type": str(f.attrs.get("model_type")),
                                     "events": int(f["event_id"].shape[0])}
        if "samples" in f:
            posterior |= {"samples per event": int(f["samples/log_prob"].shape[1]), "columns": list(f["samples"])}
        if "events/num_samples" in f:  # importance-sampled, in batches until enough effective samples
            posterior["samples drawn, median"] = float(np.median(f["events/num_samples"][()]))
        if "events/efficiency" in f:
            posterior["efficiency median"] = float(np.median(f["events/efficiency"][()]))
        divergences = [name for name in f.get("events", {}) if name.startswith("jsd_")]
        if divergences:
            posterior["network vs exact, JSD median (nat)"] = {
                name[4:]: float(np.nanmedian(f["events"][name][()])) for name in divergences}
        if "importance_sampling_skipped" in f.attrs:
            posterior["importance sampling skipped"] = str(f.attrs["importance_sampling_skipped"])
        parts.append(_section("posterior file", _yaml(posterior)))
    else:
        known = ", ".join((layouts.EVENTS, layouts.ASD, layouts.TRAFO, layouts.SVD, layouts.OBSERVED,
                           layouts.POSTERIOR))
        raise UnknownArtefact(f"{path}: an HDF5 file without a known '{layouts.ATTRIBUTE}' attribute (found "
                              f"{layout!r}; expected one of {known})")
    if "settings" in f.attrs:
        parts.append(_section("settings", _yaml(json.loads(f.attrs["settings"]))))
    parts.append(_section("provenance", _yaml(_provenance(f.attrs))))
    return "\n".join(parts)


def describe_counts(path: str | Path) -> str:
    counts = yaml.safe_load(Path(path).read_text())
    if not isinstance(counts, dict) or not all(isinstance(v, dict) and "total" in v for v in counts.values()):
        raise UnknownArtefact(f"{path}: not a counts.yaml (expected a total per split)")
    return _yaml(counts)


def describe(path: str | Path) -> str:
    """Text describing `path`; UnknownArtefact for files stagewise does not know."""
    path = Path(path)
    if not path.is_file():
        raise UnknownArtefact(f"{path}: no such file")
    if path.suffix in (".pt", ".keras"):
        try:
            return describe_model(path)
        except ValueError as err:
            raise UnknownArtefact(str(err)) from None
    if path.suffix in (".yaml", ".yml"):
        return describe_counts(path)
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            return _describe_h5(path, f)
    raise UnknownArtefact(f"{path}: not a stagewise artefact (expected a .pt model or checkpoint, a .keras "
                          "model, an HDF5 file of stagewise, or counts.yaml)")

