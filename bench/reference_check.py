"""Correctness of what a benchmark times: ours against a float64 reference, once and untimed."""
import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf when either holds a NaN or inf."""
    a, e = actual.detach().double(), expected.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return float("inf")
    diff, norm = float((a - e).norm()), float(e.norm())
    if not diff:
        return 0.0
    return diff / norm if norm else float("inf")


def assert_matches_reference(ours: dict, reference: dict, tol: float) -> None:
    """Assert every named output of ours within relative error ``tol`` of the reference (checked once,
    untimed, before a benchmark times ours: a broken fast path must not post a time)."""
    assert ours.keys() == reference.keys(), (sorted(ours), sorted(reference))
    errors = {name: relative_error(ours[name], reference[name]) for name in ours}
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"ours differs from the float64 reference beyond {tol}: {bad}"
