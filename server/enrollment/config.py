"""Which verifier each population enrolls with, from `overnight serve`'s options.

`--enrollment-secret-file FILE`: one shared secret (the file's bytes, surrounding whitespace
stripped) for every population. `--enrollment-config FILE`: a TOML table per population, for
different secrets or an allowlist:

    [population.digits]
    secret_file = "digits.secret"      # shared enrollment secret
    [population.edge-boxes]
    allowlist_file = "edge.keys"       # device ids, one per line

A population with neither takes no enrollments (its devices get PERMISSION_DENIED).
"""

from __future__ import annotations

import dataclasses
import pathlib
import tomllib

from server.enrollment.key_allowlist import KeyAllowlistVerifier
from server.enrollment.shared_secret import SharedSecretVerifier
from server.enrollment.verifier import EnrollmentClaim, EnrollmentRefused, EnrollmentVerifier


def read_secret(path: str | pathlib.Path) -> bytes:
    return pathlib.Path(path).read_bytes().strip()


@dataclasses.dataclass
class EnrollmentPolicy:
    by_population: dict[str, EnrollmentVerifier] = dataclasses.field(default_factory=dict)
    default: EnrollmentVerifier | None = None

    @classmethod
    def shared_secret(cls, secret: bytes) -> EnrollmentPolicy:
        """Every population enrolls with `secret` (tests, the demo, small deployments)."""
        return cls(default=SharedSecretVerifier(secret))

    @classmethod
    def from_files(
        cls, secret_file: str | None = None, config_file: str | None = None
    ) -> EnrollmentPolicy:
        """Raises ValueError with the offending population or file named."""
        policy = cls()
        if secret_file:
            policy.default = SharedSecretVerifier(read_secret(secret_file))
        if config_file:
            base = pathlib.Path(config_file).parent
            with open(config_file, "rb") as handle:
                tables = tomllib.load(handle).get("population", {})
            for population, table in tables.items():
                if set(table) == {"secret_file"}:
                    secret = read_secret(base / table["secret_file"])
                    policy.by_population[population] = SharedSecretVerifier(
                        secret, f"secret:{population}"
                    )
                elif set(table) == {"allowlist_file"}:
                    path = base / table["allowlist_file"]
                    policy.by_population[population] = KeyAllowlistVerifier.from_file(path)
                else:
                    raise ValueError(
                        f"{config_file}: population {population!r} needs exactly one of "
                        "secret_file or allowlist_file"
                    )
        return policy

    def verify(self, claim: EnrollmentClaim) -> str:
        """The credential id the claim used; raises EnrollmentRefused."""
        verifier = self.by_population.get(claim.population, self.default)
        if verifier is None:
            raise EnrollmentRefused(f"population {claim.population!r} takes no enrollments")
        return verifier.verify(claim)
