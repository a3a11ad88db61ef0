"""The settings of a running Serve app that change without a restart: the canary weights,
the hybrid threshold and the shadow sample rate. Validated by the config's own rules (one
definition per setting): a change is the serve section with new values, validated again.

A running app gets them from the RouterControl deployment: its ``user_config`` (a Serve config
update of it reconfigures that one replica and restarts nothing; a change of the app's
arguments restarts every replica) or the router's admin endpoint."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ray_pipeline.config import ServeSection

# The admin endpoint's body and the RouterControl deployment's user_config.
LIVE_KEYS = ("weights", "min_confidence", "shadow_sample_rate")


def live_settings(serve: ServeSection) -> dict[str, Any]:
    return {
        "weights": dict(serve.weights),
        "min_confidence": serve.hybrid.min_confidence,
        "shadow_sample_rate": serve.shadow.sample_rate,
    }


def apply_live(serve: ServeSection, changes: dict[str, Any]) -> ServeSection:
    """The serve section with live `changes` applied, validated by the config's own rules
    (ValueError naming the problem when they break one)."""
    unknown = sorted(set(changes) - set(LIVE_KEYS))
    if unknown:
        raise ValueError(f"unknown live settings {unknown}; live settings: {list(LIVE_KEYS)}")
    data = serve.model_dump()
    if "weights" in changes:
        data["weights"] = changes["weights"]
    if "min_confidence" in changes:
        data["hybrid"]["min_confidence"] = changes["min_confidence"]
    if "shadow_sample_rate" in changes:
        data["shadow"]["sample_rate"] = changes["shadow_sample_rate"]
    try:
        return ServeSection.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'serve'}: "
            f"{err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise ValueError(problems) from None
