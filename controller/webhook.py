"""``partita webhook``: the optional admission webhook that rejects malformed GpuConfig parameters.

It answers ``AdmissionReview`` (admission.k8s.io/v1) for ResourceClaims, ResourceClaimTemplates and
DeviceClasses: every opaque config for Partita's driver must be a valid GpuConfig, and the denial names
the object, the field and what is allowed (:func:`driver.api.config.validate_claim_configs`, the same
check the controller reports as a pod Event and the plugin applies at prepare). Served over TLS with the
certificate the Helm chart mounts; ``/healthz`` answers for probes.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl

from aiohttp import web

from driver.api import constants as C
from driver.api.config import validate_claim_configs
from driver.api.messages import bound_list
from driver.cliopts import add_log_level

log = logging.getLogger("partita.webhook")


def review(body: dict, driver: str) -> dict:
    """The AdmissionReview response for an AdmissionReview request."""
    request = body.get("request") or {}
    uid = request.get("uid", "")
    obj = request.get("object") or {}
    kind = (request.get("kind") or {}).get("kind") or obj.get("kind", "")
    md = obj.get("metadata") or {}
    name = "/".join(p for p in (md.get("namespace") or request.get("namespace"), md.get("name") or request.get("name")) if p)
    where = f"{kind} {name}"
    spec = obj.get("spec") or {}
    if kind == "ResourceClaimTemplate":
        errors = validate_claim_configs(spec.get("spec") or {}, driver, f"{where}: spec.spec.devices")
    elif kind == "ResourceClaim":
        errors = validate_claim_configs(spec, driver, f"{where}: spec.devices")
    elif kind == "DeviceClass":
        errors = validate_claim_configs(spec, driver, f"{where}: spec")
    else:
        errors = []
    response: dict = {"uid": uid, "allowed": not errors}
    if errors:
        response["status"] = {"code": 422, "reason": "Invalid", "message": bound_list(errors)}
        log.info("denied %s: %s", where, response["status"]["message"])
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def make_app(driver: str) -> web.Application:
    async def validate(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "expected an AdmissionReview JSON body"}, status=400)
        return web.json_response(review(body, driver))

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/validate", validate)
    app.router.add_get("/healthz", healthz)
    return app


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--driver-name", default=env("DRIVER_NAME", C.DEFAULT_DRIVER_NAME), help="env DRIVER_NAME")
    p.add_argument("--port", type=int, default=int(env("WEBHOOK_PORT", "8443")), help="env WEBHOOK_PORT")
    p.add_argument("--tls-cert", default=env("TLS_CERT_FILE", "/etc/partita/tls/tls.crt"), help="env TLS_CERT_FILE")
    p.add_argument("--tls-key", default=env("TLS_KEY_FILE", "/etc/partita/tls/tls.key"), help="env TLS_KEY_FILE")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (tests only)")
    add_log_level(p, env("LOG_LEVEL", "INFO"), "env LOG_LEVEL")


def run(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(str(args.log_level).upper())
    context = None
    if not args.insecure:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(args.tls_cert, args.tls_key)
        except OSError as e:
            print(f"partita webhook: cannot load the TLS certificate {args.tls_cert} / key {args.tls_key}: {e}; "
                  "the chart mounts them from the webhook's Secret", flush=True)
            return 2
    web.run_app(make_app(args.driver_name), port=args.port, ssl_context=context, print=None, access_log=None)
    return 0
