"""Every attack scenario the built-in VTL0 carries, each in a fresh partition: the outcome
the VMM observes (targets, MSRs and registers read back, code markers, events) is
"blocked", and every scenario that names a target had it checked by the VMM.

Each run is `run_attack`, what `vtl attack` runs for the scenario (tests/vtlrun.py
attack_run: once per session, test_g9_policy.py asserts more on the same runs); with
test_xvp_attacks.py's cross-VP attacks this is every attack `vtl attack` runs, so
test_cli.py runs the command itself on a few."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vtlrun import attack_run
from vtl.core.images import default_vtl0_image, default_vtl1_image
from vtl.tools.attack import attack_scenarios

pytestmark = pytest.mark.kvm


def _attacks() -> list[tuple[str, str]]:
    """The one-VP attacks: those that need a second VP are tests/test_xvp_attacks.py's."""
    image = default_vtl0_image()
    return attack_scenarios(image, max_vps=1) if image.exists() else []


@pytest.mark.parametrize("name,expected", _attacks())
def test_attack_is_blocked_as_the_vmm_observes(guest_images: tuple[Path, Path], name: str,
                                               expected: str) -> None:
    r = attack_run(guest_images, name).result
    assert r.expected == expected
    assert r.outcome == "blocked", (r.outcome, r.mechanism, r.changed)
    assert r.mechanism != "none observed", r


def test_there_are_attacks_to_run(guest_images: tuple[Path, Path]) -> None:
    assert len(attack_scenarios(guest_images[0])) >= 15
    assert default_vtl1_image().exists()
