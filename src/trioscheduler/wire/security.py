"""``Security``: who may talk to the cluster, with dask's field names and config keys.

A ``Security`` holds the CA, and a certificate and key per role (``client``,
``scheduler``, ``worker``); each value is a file path or the PEM text itself (as
``Security.temporary()`` makes). From it every listener and connector gets an
``ssl.SSLContext`` that presents the role's certificate *and* requires one signed by the
CA from the other side (mutual TLS). Host names are not checked: a cluster has its own
CA and is addressed by IP as often as by name (dask does the same).

``require_encryption`` makes every listener and connector of the process refuse plain
``tcp://``. Fields not given come from dask's config (``distributed.comm.tls.*``,
``distributed.comm.require-encryption``), so a dask user's settings keep working.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from collections.abc import Mapping
from typing import Any, Final

from trioscheduler.errors import TrioSchedulerError

ROLES: Final = ("client", "scheduler", "worker")

_CONFIG: Final = {
    "tls_ca_file": "distributed.comm.tls.ca-file",
    "tls_ciphers": "distributed.comm.tls.ciphers",
    "tls_client_key": "distributed.comm.tls.client.key",
    "tls_client_cert": "distributed.comm.tls.client.cert",
    "tls_scheduler_key": "distributed.comm.tls.scheduler.key",
    "tls_scheduler_cert": "distributed.comm.tls.scheduler.cert",
    "tls_worker_key": "distributed.comm.tls.worker.key",
    "tls_worker_cert": "distributed.comm.tls.worker.cert",
}
_VERSIONS: Final = {
    None: None,
    1.2: ssl.TLSVersion.TLSv1_2,
    1.3: ssl.TLSVersion.TLSv1_3,
    ssl.TLSVersion.TLSv1_2: ssl.TLSVersion.TLSv1_2,
    ssl.TLSVersion.TLSv1_3: ssl.TLSVersion.TLSv1_3,
}


class SecurityError(TrioSchedulerError, ValueError):
    """A TLS setting that cannot work (a ``tls://`` address without certificates...)."""


def _config(key: str, default: Any = None) -> Any:
    try:
        import dask.config
    except ImportError:  # pragma: no cover - dask is a dependency
        return default
    return dask.config.get(key, default)


class Security:
    """TLS settings of a cluster: dask's ``distributed.Security``, same fields.

    ``Security()`` with no argument (and no dask config) means no TLS. Giving any
    certificate turns ``require_encryption`` on unless it is given explicitly.
    """

    __slots__ = (
        "require_encryption",
        "tls_ca_file",
        "tls_ciphers",
        "tls_min_version",
        "tls_max_version",
        "tls_client_key",
        "tls_client_cert",
        "tls_scheduler_key",
        "tls_scheduler_cert",
        "tls_worker_key",
        "tls_worker_cert",
        "extra_conn_args",
    )

    require_encryption: bool
    tls_ca_file: str | None
    tls_ciphers: str | None
    tls_min_version: ssl.TLSVersion
    tls_max_version: ssl.TLSVersion | None
    tls_client_key: str | None
    tls_client_cert: str | None
    tls_scheduler_key: str | None
    tls_scheduler_cert: str | None
    tls_worker_key: str | None
    tls_worker_cert: str | None
    extra_conn_args: dict[str, Any]

    def __init__(self, require_encryption: bool | None = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(self.__slots__)
        if unknown:
            raise TypeError(f"Security got unknown parameters: {sorted(unknown)!r}")
        extra = kwargs.pop("extra_conn_args", None)
        if extra is not None and not isinstance(extra, Mapping):
            raise TypeError(f"extra_conn_args must be a mapping, not {type(extra).__name__}")
        self.extra_conn_args = dict(extra or {})
        for field, key in _CONFIG.items():
            setattr(self, field, kwargs[field] if field in kwargs else _config(key))
        self.tls_min_version = self._version(
            kwargs, "tls_min_version", "distributed.comm.tls.min-version"
        ) or ssl.TLSVersion.TLSv1_2
        self.tls_max_version = self._version(
            kwargs, "tls_max_version", "distributed.comm.tls.max-version"
        )
        if require_encryption is None:
            require_encryption = _config("distributed.comm.require-encryption")
        if require_encryption is None:
            require_encryption = bool(kwargs)
        self.require_encryption = bool(require_encryption)

    @staticmethod
    def _version(kwargs: dict[str, Any], field: str, key: str) -> ssl.TLSVersion | None:
        value = kwargs[field] if field in kwargs else _config(key)
        try:
            return _VERSIONS[value]
        except (KeyError, TypeError):
            raise ValueError(
                f"{field}={value!r} is not supported; use 1.2, 1.3 or ssl.TLSVersion.TLSv1_2/3"
            ) from None

    @classmethod
    def temporary(cls, **kwargs: Any) -> Security:
        """A throwaway self-signed CA-and-certificate for every role, kept in memory.

        Needs the ``cryptography`` package (``pip install trioscheduler[tls]``).
        """
        try:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.x509.oid import NameOID
        except ImportError:
            raise ImportError(
                "Security.temporary() needs the 'cryptography' package: "
                "pip install 'trioscheduler[tls]' (or pip install cryptography)"
            ) from None
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trioscheduler-internal")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName("trioscheduler-internal")]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        fields: dict[str, Any] = {"tls_ca_file": cert_pem}
        for role in ROLES:
            fields[f"tls_{role}_cert"] = cert_pem
            fields[f"tls_{role}_key"] = key_pem
        return cls(**{"require_encryption": True, **fields, **kwargs})

    # ------------------------------------------------------------------------ contexts

    def get_tls_config_for_role(self, role: str) -> dict[str, Any]:
        """``{"ca_file", "ciphers", "cert", "key"}`` of ``role`` (dask's method)."""
        role = _role(role)
        return {
            "ca_file": self.tls_ca_file,
            "ciphers": self.tls_ciphers,
            "cert": getattr(self, f"tls_{role}_cert"),
            "key": getattr(self, f"tls_{role}_key"),
        }

    def get_connection_args(self, role: str) -> dict[str, Any]:
        """What a connector of ``role`` needs: ``ssl_context`` (or None), ``require_encryption``."""
        return {
            "ssl_context": self._context(role, ssl.Purpose.SERVER_AUTH),
            "require_encryption": self.require_encryption,
            "extra_conn_args": dict(self.extra_conn_args),
        }

    def get_listen_args(self, role: str) -> dict[str, Any]:
        """What a listener of ``role`` needs: ``ssl_context`` (or None), ``require_encryption``."""
        return {
            "ssl_context": self._context(role, ssl.Purpose.CLIENT_AUTH),
            "require_encryption": self.require_encryption,
        }

    def _context(self, role: str, purpose: ssl.Purpose) -> ssl.SSLContext | None:
        tls = self.get_tls_config_for_role(role)
        ca, cert, key = tls["ca_file"], tls["cert"], tls["key"]
        if not ca and not cert:
            if self.require_encryption:
                raise SecurityError(
                    f"require_encryption is set but there is no CA and certificate for the "
                    f"{_role(role)!r} role: give tls_ca_file and tls_{_role(role)}_cert/_key"
                )
            return None
        if not ca or not cert:
            missing = "tls_ca_file" if not ca else f"tls_{_role(role)}_cert"
            raise SecurityError(f"TLS for the {_role(role)!r} role needs {missing} as well")
        try:
            if "\n" in ca:
                ctx = ssl.create_default_context(purpose, cadata=ca)
            else:
                ctx = ssl.create_default_context(purpose, cafile=ca)
            ctx.minimum_version = self.tls_min_version
            if self.tls_max_version is not None:
                ctx.maximum_version = self.tls_max_version
            _load_cert_chain(ctx, cert, key)
            if self.tls_ciphers:
                ctx.set_ciphers(self.tls_ciphers)
        except (OSError, ssl.SSLError) as e:
            raise SecurityError(f"cannot load the TLS files of the {role!r} role: {e}") from e
        ctx.check_hostname = False  # the cluster's own CA; peers addressed by IP too
        ctx.verify_mode = ssl.CERT_REQUIRED  # both sides: mutual TLS
        ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT
        return ctx

    # ----------------------------------------------------------------------- plumbing

    def __repr__(self) -> str:
        parts = []
        for field in sorted(self.__slots__):
            value = getattr(self, field)
            if field == "extra_conn_args" or value is None:
                continue
            if isinstance(value, str) and "\n" in value:
                value = "Temporary (In-memory)"
            elif isinstance(value, str):
                value = f"Local ({os.path.abspath(value)})"
            parts.append(f"{field}={value}")
        return f"Security({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Security):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data (for a child process: ``Security(**d)``)."""
        out: dict[str, Any] = {}
        for field in self.__slots__:
            value = getattr(self, field)
            if isinstance(value, ssl.TLSVersion):
                value = 1.3 if value == ssl.TLSVersion.TLSv1_3 else 1.2
            out[field] = value
        return out

    def acting_as(self, role: str, fallback: str) -> Security:
        """A copy whose ``role`` uses ``fallback``'s certificate where it has none of its own
        (a worker's own client, as ``get_client`` makes, presents the worker certificate)."""
        if getattr(self, f"tls_{role}_cert"):
            return self
        fields = self.to_dict()
        fields[f"tls_{role}_cert"] = getattr(self, f"tls_{fallback}_cert")
        fields[f"tls_{role}_key"] = getattr(self, f"tls_{fallback}_key")
        return Security(**fields)

    @property
    def enabled(self) -> bool:
        """True if TLS is configured (a CA is set)."""
        return bool(self.tls_ca_file)


def _role(role: str) -> str:
    """Our connection roles onto dask's three: a nanny presents the worker certificate."""
    mapped = {"nanny": "worker", "peer": "worker"}.get(role, role)
    if mapped not in ROLES:
        raise ValueError(f"unknown TLS role {role!r}; expected one of {', '.join(ROLES)}")
    return mapped


def _load_cert_chain(ctx: ssl.SSLContext, cert: str, key: str | None) -> None:
    """Certificates and keys may be PEM text (``temporary()``) or paths."""
    if "\n" not in cert and (key is None or "\n" not in key):
        ctx.load_cert_chain(cert, key)
        return
    with tempfile.TemporaryDirectory(prefix="trioscheduler-tls-") as tmp:
        cert_path = cert
        key_path = key
        if "\n" in cert:
            cert_path = os.path.join(tmp, "cert.pem")
            with open(cert_path, "w") as f:
                f.write(cert)
        if key is not None and "\n" in key:
            key_path = os.path.join(tmp, "key.pem")
            with open(key_path, "w", opener=lambda p, fl: os.open(p, fl, 0o600)) as f:
                f.write(key)
        ctx.load_cert_chain(cert_path, key_path)


def resolve(security: Security | bool | None) -> Security | None:
    """``security=`` as callers give it: ``True`` means ``Security.temporary()``."""
    if security is None or security is False:
        return None
    if security is True:
        return Security.temporary()
    if not isinstance(security, Security):
        if hasattr(security, "tls_ca_file") and hasattr(security, "require_encryption"):
            # dask's own distributed.Security: same fields, taken over as they are
            fields = {f: getattr(security, f) for f in Security.__slots__ if hasattr(security, f)}
            return Security(**fields)
        raise TypeError(
            f"security= takes a trioscheduler.Security (or True for a temporary one), "
            f"not {type(security).__name__}"
        )
    return security


def listen_args(security: Security | None, role: str) -> dict[str, Any]:
    """Keywords for ``wire.listen`` of ``role`` (none without security)."""
    return {} if security is None else security.get_listen_args(role)


def connect_args(security: Security | None, role: str) -> dict[str, Any]:
    """Keywords for ``wire.connect``/``ConnectionPool`` of ``role`` (none without security)."""
    if security is None:
        return {}
    args = security.get_connection_args(role)
    args.pop("extra_conn_args", None)
    return args


def default_scheme(security: Security | None) -> str:
    """``tls`` when certificates are set, else ``tcp``: what a default address uses."""
    return "tls" if security is not None and security.enabled else "tcp"


def write_role_files(security: Security, role: str, directory: str) -> list[str]:
    """The CA, cert and key of ``role`` as files in ``directory`` (0600), for a child
    process: returns its ``--tls-ca-file --tls-cert --tls-key`` arguments. Paths stay
    paths; PEM text is written out (never on a command line, where ``ps`` shows it)."""
    tls = security.get_tls_config_for_role(role)
    argv: list[str] = []
    for flag, name in (("--tls-ca-file", "ca_file"), ("--tls-cert", "cert"), ("--tls-key", "key")):
        value = tls[name]
        if not value:
            continue
        if "\n" in value:
            path = os.path.join(directory, f"{role}-{name}.pem")
            with open(path, "w", opener=lambda p, fl: os.open(p, fl, 0o600)) as f:
                f.write(value)
            value = path
        argv += [flag, value]
    return argv
