"""A thin async JSON layer over the official Kubernetes client (kubernetes.aio).

The official client does configuration and authentication (in-cluster service account, kubeconfig,
TLS, exec plugins); Partita talks API JSON (camelCase dicts) through it, the same shape the API server,
kopf and the allocator use, without round-tripping every object through generated models.

    kube = await Kube.connect()                     # in-cluster, else kubeconfig
    kube = await Kube.connect(kubeconfig="~/k.yaml", context="prod")   # that kubeconfig and context
    kube = await Kube.connect("http://127.0.0.1:8001")   # plain HTTP (sandbox, tests, kubectl proxy)
    claim = await kube.get(claim_path("ns", "name"))
    async for event in kube.watch(SLICES, params={"fieldSelector": "spec.nodeName=n1"}): ...
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, AsyncIterator, Mapping
from urllib.parse import quote

from driver.api.messages import bound, brief
from driver.api.naming import MAX_DNS_LABEL, MAX_DNS_SUBDOMAIN, is_dns_label, is_dns_subdomain
from driver.errors import PartitaError

log = logging.getLogger(__name__)

_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")

SLICES = "/apis/resource.k8s.io/v1/resourceslices"
DEVICE_CLASSES = "/apis/resource.k8s.io/v1/deviceclasses"
NODES = "/api/v1/nodes"
PODS = "/api/v1/pods"
CLAIMS = "/apis/resource.k8s.io/v1/resourceclaims"

# -- object names in API paths ------------------------------------------------------------------
# Every path this module builds validates each name (DNS-1123, as the API server validates the
# object's metadata) and percent-quotes it as one path segment, so a name such as
# ``../../api/v1/nodes/x`` or ``x?watch=true`` can never address another object or open a watch.

MAX_LABEL = MAX_DNS_LABEL
MAX_SUBDOMAIN = MAX_DNS_SUBDOMAIN


class InvalidName(PartitaError, ValueError):
    """A namespace or object name that is not a valid Kubernetes name; the message names the field."""

    def __init__(self, field: str, value: object, rule: str):
        super().__init__(f"{field} {brief(value)} is not a valid Kubernetes name: {rule}")
        self.field = field


def check_namespace(value: object, field: str = "namespace") -> str:
    """A namespace is a DNS-1123 label: at most 63 lowercase alphanumerics or '-', alphanumeric at both ends."""
    if not is_dns_label(value):
        raise InvalidName(field, value, f"a namespace must be a DNS-1123 label (at most {MAX_LABEL} lowercase "
                                        "letters, digits or '-', starting and ending with a letter or digit)")
    return value


def check_name(value: object, field: str = "name") -> str:
    """An object name (claim, node, slice, lease) is a DNS-1123 subdomain: at most 253 characters of
    DNS labels joined by '.'."""
    if not is_dns_subdomain(value):
        raise InvalidName(field, value, f"an object name must be a DNS-1123 subdomain (at most {MAX_SUBDOMAIN} "
                                        "lowercase letters, digits, '-' or '.', starting and ending with a letter "
                                        "or digit)")
    return value


def segment(value: str) -> str:
    """One path segment, percent-quoted ('/', '?', '#', '%' and the rest escaped)."""
    return quote(value, safe="")


def namespaced_path(collection: str, namespace: str, plural: str, name: str | None = None, *,
                    kind: str = "object") -> str:
    """``<collection>/namespaces/<ns>/<plural>[/<name>]`` for an API prefix such as ``/api/v1`` or
    ``/apis/coordination.k8s.io/v1``, with both names checked and quoted."""
    path = f"{collection}/namespaces/{segment(check_namespace(namespace, f'{kind} namespace'))}/{plural}"
    return f"{path}/{segment(check_name(name, f'{kind} name'))}" if name is not None else path


def claims_path(namespace: str | None = None) -> str:
    return namespaced_path("/apis/resource.k8s.io/v1", namespace, "resourceclaims", kind="ResourceClaim") \
        if namespace else CLAIMS


def claim_path(namespace: str, name: str, status: bool = False) -> str:
    return namespaced_path("/apis/resource.k8s.io/v1", namespace, "resourceclaims", name, kind="ResourceClaim") \
        + ("/status" if status else "")


def slice_path(name: str) -> str:
    return f"{SLICES}/{segment(check_name(name, 'ResourceSlice name'))}"


def node_path(name: str) -> str:
    return f"{NODES}/{segment(check_name(name, 'Node name'))}"


def device_taint_rules_path(version: str) -> str:
    """DeviceTaintRules (cluster-scoped) in the resource.k8s.io version API discovery found serving them."""
    return f"/apis/resource.k8s.io/{segment(version)}/devicetaintrules"


class KubeError(PartitaError):
    """A non-2xx answer from the API server (``status`` is the HTTP status, ``reason`` the Status reason)."""

    def __init__(self, status: int, reason: str, message: str, method: str = "", path: str = ""):
        message = bound(str(message))        # an API server message may quote a whole object
        super().__init__(bound(f"{method} {path}: {status} {reason}: {message}".strip()))
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def invalid(self) -> bool:
        return self.status == 422

    @staticmethod
    def of(status: int, reason: str, message: str, method: str = "", path: str = "") -> "KubeError":
        """The error for an answer: :class:`KubeNotFound`, :class:`KubeConflict` or :class:`KubeInvalid`
        for 404, 409 and 422 (so callers can ``except`` them), else a plain :class:`KubeError`."""
        return _BY_STATUS.get(status, KubeError)(status, reason, message, method, path)


class KubeNotFound(KubeError):
    """404: the object (or its namespace) does not exist."""


class KubeConflict(KubeError):
    """409: a stale resourceVersion, a failed precondition, or the object already exists."""


class KubeInvalid(KubeError):
    """422: the API server refused the object as invalid (the message names the field)."""


_BY_STATUS: dict[int, type[KubeError]] = {404: KubeNotFound, 409: KubeConflict, 422: KubeInvalid}


SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


async def configure(url: str | None = None, *, kubeconfig: str | None = None,
                    context: str | None = None) -> tuple[Any, str]:
    """The one connection set-up: the official client's ``Configuration`` and the connection's default
    namespace, for a plain-HTTP API URL; else, with ``kubeconfig`` or ``context``, that kubeconfig file
    (default ``$KUBECONFIG``, else ``~/.kube/config``) and context (default its current one); else the
    in-cluster service account, falling back to the kubeconfig."""
    from kubernetes.aio import client, config

    namespace = "default"
    if url:
        cfg = client.Configuration(host=url.rstrip("/"))
    else:
        cfg = client.Configuration()
        loaded = False
        if not kubeconfig and not context:
            try:
                config.load_incluster_config(client_configuration=cfg)
                loaded = True
                namespace = _read_text(SERVICE_ACCOUNT_NAMESPACE) or namespace
            except config.ConfigException:
                pass
        if not loaded:
            loader = await config.load_kube_config(config_file=kubeconfig, context=context,
                                                   client_configuration=cfg, persist_config=False)
            current = loader.current_context or {}
            namespace = ((current.get("context") if isinstance(current, dict) else None) or {}).get(
                "namespace") or namespace
    if not any(os.environ.get(v) for v in _PROXY_VARS):
        # Without proxy variables, aiohttp's trust_env only costs time: it re-reads proxy settings and
        # ~/.netrc on every request (about a third of a GET against a local API server).
        import aiohttp

        cfg.client_session_kwargs = {"trust_env": False, "cookie_jar": aiohttp.DummyCookieJar()}
    return cfg, namespace


class Kube:
    """Async API access with JSON dicts in and out. ``namespace``: the connection's default namespace
    (the kubeconfig context's, in a pod its own, else ``default``), what ``-n`` defaults to."""

    def __init__(self, api_client: Any, namespace: str = "default"):
        self._api = api_client
        self.namespace = namespace

    @classmethod
    async def connect(cls, url: str | None = None, *, kubeconfig: str | None = None,
                      context: str | None = None) -> "Kube":
        """A client connected as :func:`configure` says."""
        from kubernetes.aio import client

        cfg, namespace = await configure(url, kubeconfig=kubeconfig, context=context)
        return cls(client.ApiClient(cfg), namespace)

    @property
    def configuration(self) -> Any:
        """The official client's configuration this client was connected with (server, TLS, credentials)."""
        return self._api.configuration

    @property
    def server(self) -> str:
        return str(self._api.configuration.host).rstrip("/")

    async def close(self) -> None:
        await self._api.close()

    async def __aenter__(self) -> "Kube":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- requests -------------------------------------------------------------------------------
    async def _send(self, method: str, path: str, params: Mapping[str, Any] | None, body: Any,
                    content_type: str | None, timeout: float | None) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        query = [(k, _qv(v)) for k, v in (params or {}).items() if v is not None]
        method_, url, hdrs, body_, _ = await self._api.param_serialize(
            method=method, resource_path=path, query_params=query, header_params=headers, body=body,
            auth_settings=["BearerToken"])
        resp = await self._api.call_api(method_, url, header_params=hdrs, body=body_, _preload_content=False,
                                        _request_timeout=timeout)
        return resp.response

    async def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                      body: Any = None, content_type: str | None = None, timeout: float | None = 30) -> dict:
        resp = await self._send(method, path, params, body, content_type, timeout)
        try:
            data = await resp.read()
        finally:
            resp.release()
        if resp.status >= 400:
            obj = _status(data)
            raise KubeError.of(resp.status, obj.get("reason", resp.reason or ""),
                               obj.get("message", data[:500].decode("utf-8", "replace")), method, path)
        return json.loads(data) if data else {}

    async def get(self, path: str, **params: Any) -> dict:
        return await self.request("GET", path, params=params)

    async def list(self, path: str, **params: Any) -> dict:
        return await self.request("GET", path, params=params)

    async def create(self, path: str, body: dict) -> dict:
        return await self.request("POST", path, body=body)

    async def replace(self, path: str, body: dict) -> dict:
        """PUT: the body's metadata.resourceVersion is the optimistic-concurrency precondition."""
        return await self.request("PUT", path, body=body)

    async def merge_patch(self, path: str, body: dict) -> dict:
        return await self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    async def json_patch(self, path: str, ops: list[dict]) -> dict:
        return await self.request("PATCH", path, body=ops, content_type="application/json-patch+json")

    async def delete(self, path: str, *, uid: str | None = None, resource_version: str | None = None,
                     **params: Any) -> dict:
        body = None
        if uid or resource_version:
            pre = {k: v for k, v in (("uid", uid), ("resourceVersion", resource_version)) if v}
            body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": pre}
        return await self.request("DELETE", path, params=params, body=body)

    async def watch(self, path: str, *, resource_version: str | None = None, timeout_seconds: int = 300,
                    **params: Any) -> AsyncIterator[dict]:
        """Watch events ``{"type", "object"}`` until the server closes the stream. An ``ERROR`` event
        with code 410 means the version is too old: list again."""
        q = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": timeout_seconds,
             "resourceVersion": resource_version, **params}
        resp = await self._send("GET", path, q, None, None, timeout_seconds + 30)
        try:
            if resp.status >= 400:
                obj = _status(await resp.read())
                raise KubeError.of(resp.status, obj.get("reason", ""), obj.get("message", ""), "WATCH", path)
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release()


def _status(data: bytes) -> dict:
    """The Status object of an error answer; {} when the body is not one (a proxy's HTML page)."""
    try:
        obj = json.loads(data) if data else {}
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def _qv(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""
