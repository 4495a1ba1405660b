"""The pins of a requirements file that apply to one target Python and CPU, markers resolved.

`python requirements/for_target.py requirements/device.txt 3.12 aarch64` prints the pins (with
their hashes) that a Linux device with CPython 3.12 on aarch64 installs. `make
check-edge-wheels` feeds them to `pip download --platform ... --python-version ...`, because
pip evaluates environment markers against the interpreter running it, not the target.
"""

from __future__ import annotations

import sys

from packaging.markers import Marker


def target_environment(python: str, machine: str) -> dict[str, str]:
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "platform_machine": machine,
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }


def pins_for_target(requirements: str, python: str, machine: str) -> list[str]:
    environment = target_environment(python, machine)
    entries = requirements.replace("\\\n", " ").splitlines()
    pins = []
    for entry in entries:
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        requirement, _, hashes = entry.partition(" --hash")
        pin, _, marker = requirement.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate(environment):
            continue
        pins.append(f"{pin.strip()} --hash{hashes}" if hashes else pin.strip())
    return pins


if __name__ == "__main__":
    path, python, machine = sys.argv[1:4]
    with open(path) as requirements:
        print("\n".join(pins_for_target(requirements.read(), python, machine)))
