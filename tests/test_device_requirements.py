"""requirements/device.txt is the device runtime's install set: complete, and TensorFlow-free."""

import pathlib
import re
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _names(requirements: str) -> set[str]:
    pinned = re.findall(r"^([A-Za-z0-9_.-]+)==", requirements, flags=re.MULTILINE)
    return {name.lower().replace("_", "-") for name in pinned}


def test_device_requirements_pin_every_base_dependency_and_no_tensorflow() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    pinned = _names((REPO / "requirements" / "device.txt").read_text())

    assert base <= pinned, f"missing from requirements/device.txt: {sorted(base - pinned)}"
    assert not {n for n in pinned if n.startswith(("tensorflow", "jax", "keras", "scikit"))}
