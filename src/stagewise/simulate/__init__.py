"""The embedded toy problem: ringdown-like damped sinusoids seen by two detectors."""
