"""Who may call the admin service: operator credentials, roles, and the check of both.

A credential is a bearer token (gRPC metadata `authorization: Bearer TOKEN`) or, when the
admin listener is given an operator CA, a client certificate whose subject OU names a role.
Tokens are kept only as SHA-256 hashes (`admin_tokens.json` in the data directory, 0600) and
compared in constant time. A token is 256 random bits, so a plain hash is as strong as a slow
password hash would be, and checking one costs microseconds.

Every admin call is checked, and a method not listed as read-only needs the operator role:
- no credential, or one that matches nothing: UNAUTHENTICATED;
- a valid credential whose role does not allow the method: PERMISSION_DENIED.

The open services on the admin listener, health and reflection (server/health.py), need no
credential: a load balancer's probe has none, and they reveal only whether the coordinator
serves and the admin API's schema (public in protos/), never data or an admin action.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import inspect
import json
import logging
import os
import pathlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, assert_never

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from protos import admin_pb2
from server.errors import CoordinatorError, PermissionDenied, Unauthenticated, status_code
from server.method_wrapping import WrappingInterceptor
from server.private_files import write_private_file

log = logging.getLogger(__name__)

TOKENS_FILE = "admin_tokens.json"
# `overnight serve` writes the first operator token here (0600) when it finds no token at all.
FIRST_TOKEN_FILE = "operator.token"
TOKEN_ENV = "OVERNIGHT_ADMIN_TOKEN"
_BEARER = "bearer "


class Role(enum.Enum):
    VIEWER = "viewer"  # reads: task status, tasks, rounds (listed and watched), the cluster
    OPERATOR = "operator"  # everything: also registers, pauses, resumes and cancels tasks


ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
READ_ONLY_METHODS = frozenset(
    f"/{ADMIN_SERVICE}/{name}"
    for name in ("GetTaskStatus", "ListTasks", "ListRounds", "WatchRounds", "GetCluster")
)


def required_role(method: str) -> Role:
    """The role a method needs. Anything not known to be read-only needs an operator, so a
    method added later is closed until someone decides otherwise."""
    return Role.VIEWER if method in READ_ONLY_METHODS else Role.OPERATOR


def permits(held: Role, needed: Role) -> bool:
    match held:
        case Role.OPERATOR:
            return True
        case Role.VIEWER:
            return needed is Role.VIEWER
        case _:
            assert_never(held)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class TokenEntry:
    token_id: str  # a short public name, to list and revoke a token without knowing it
    role: Role
    sha256: str
    created_at: float


class AdminTokens:
    """The hashed admin tokens of one data directory.

    Re-reads the file when it changes, so `overnight admin-token create` and `revoke` take
    effect on a running coordinator without a restart.
    """

    def __init__(self, data_dir: str | pathlib.Path) -> None:
        self.path = pathlib.Path(data_dir) / TOKENS_FILE
        self._entries: list[TokenEntry] = []
        self._seen: tuple[int, int] | None = None

    def entries(self) -> list[TokenEntry]:
        self._reload()
        return list(self._entries)

    def create(self, role: Role) -> tuple[TokenEntry, str]:
        """Adds a token with this role; returns its entry and the token, which is shown
        once and never stored."""
        token = secrets.token_urlsafe(32)
        entry = TokenEntry(secrets.token_hex(4), role, token_sha256(token), time.time())
        self._save([*self.entries(), entry])
        return entry, token

    def revoke(self, token_id: str) -> bool:
        entries = self.entries()
        kept = [e for e in entries if e.token_id != token_id]
        if len(kept) == len(entries):
            return False
        self._save(kept)
        return True

    def role_of(self, token: str) -> Role | None:
        """The role of a presented token, or None. Every stored hash is compared, each in
        constant time, so the answer's timing does not depend on which hash matched."""
        digest = token_sha256(token)
        found: Role | None = None
        for entry in self.entries():
            if hmac.compare_digest(entry.sha256, digest):
                found = entry.role
        return found

    def _reload(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._entries, self._seen = [], None
            return
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return
        raw = json.loads(self.path.read_text())
        self._entries = [
            TokenEntry(e["token_id"], Role(e["role"]), e["sha256"], e["created_at"])
            for e in raw["tokens"]
        ]
        self._seen = seen

    def _save(self, entries: list[TokenEntry]) -> None:
        document = {
            "tokens": [
                {
                    "token_id": e.token_id,
                    "role": e.role.value,
                    "sha256": e.sha256,
                    "created_at": e.created_at,
                }
                for e in entries
            ]
        }
        write_private_file(self.path, json.dumps(document, indent=1).encode())
        self._seen = None


def ensure_first_token(data_dir: str | pathlib.Path) -> pathlib.Path | None:
    """On a coordinator's first start (no admin token at all): makes an operator token and
    writes it, 0600, to DATA_DIR/operator.token; returns that path (None if tokens exist)."""
    tokens = AdminTokens(data_dir)
    if tokens.entries():
        return None
    _, token = tokens.create(Role.OPERATOR)
    return write_private_file(pathlib.Path(data_dir) / FIRST_TOKEN_FILE, f"{token}\n".encode())


def read_admin_token(token_file: str | None) -> str | None:
    """The operator credential a command presents: from `--admin-token-file`, else from the
    OVERNIGHT_ADMIN_TOKEN environment variable, else None."""
    if token_file:
        return pathlib.Path(token_file).read_text().strip()
    return os.environ.get(TOKEN_ENV, "").strip() or None


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the token (empty without one: the server answers
    UNAUTHENTICATED)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def role_from_certificate(pem: bytes) -> Role | None:
    """The role a verified client certificate names in its subject's OU, if any."""
    certificate = x509.load_pem_x509_certificate(pem)
    for attribute in certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
        value = attribute.value if isinstance(attribute.value, str) else attribute.value.decode()
        try:
            return Role(value)
        except ValueError:
            continue
    return None


Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]


class OperatorAuthentication(WrappingInterceptor):
    """Checks the caller's credential and role before any admin handler runs.

    `certificate_roles`: the listener verifies client certificates against an operator CA,
    so a certificate's OU may stand in for a token.
    """

    def __init__(self, tokens: AdminTokens, certificate_roles: bool = False) -> None:
        super().__init__()
        self._tokens = tokens
        self._certificate_roles = certificate_roles

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        needed = required_role(method)
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._guard(handler.unary_unary, needed))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._guard(handler.stream_unary, needed))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._guard_stream(handler.unary_stream, needed))
        return handler._replace(stream_stream=self._guard_stream(handler.stream_stream, needed))

    def _guard(self, behaviour: Behaviour, needed: Role) -> Behaviour:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._authorize(context, needed)
            return await behaviour(request, context)

        return guarded

    def _guard_stream(self, behaviour: Behaviour, needed: Role) -> Behaviour:
        if not inspect.isasyncgenfunction(behaviour):
            raise TypeError(f"admin streaming handler {behaviour!r} must be an async generator")

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._authorize(context, needed)
            async for response in behaviour(request, context):
                yield response

        return guarded

    async def _authorize(self, context: grpc.aio.ServicerContext, needed: Role) -> None:
        try:
            held = self._role(context)
            if not permits(held, needed):
                raise PermissionDenied(
                    f"the {held.value} role may not call this method; it needs {needed.value}"
                )
        except CoordinatorError as exc:
            log.warning("admin call refused: %s %s", status_code(exc).name, exc)
            await context.abort(status_code(exc), str(exc))

    def _role(self, context: grpc.aio.ServicerContext) -> Role:
        metadata = dict(context.invocation_metadata() or ())
        header = metadata.get("authorization")
        if header is not None:
            if not isinstance(header, str) or not header.lower().startswith(_BEARER):
                raise Unauthenticated("the authorization header must be 'Bearer TOKEN'")
            role = self._tokens.role_of(header[len(_BEARER) :].strip())
            if role is None:
                raise Unauthenticated("unknown or revoked admin token")
            return role
        if self._certificate_roles:
            certificates = context.auth_context().get("x509_pem_cert") or []
            role = role_from_certificate(certificates[0]) if certificates else None
            if role is not None:
                return role
        raise Unauthenticated(
            "admin calls need an operator credential: a bearer token (--admin-token-file or "
            f"{TOKEN_ENV}) or an operator client certificate"
        )
