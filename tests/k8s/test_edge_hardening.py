"""The edge and the namespaces, as their controllers read them: which routes the Gateway's listener
takes (Gateway API attachment rules), which client certificates Envoy Gateway's ClientTrafficPolicy
accepts (real certificates and a real CRL, checked as Envoy checks them: chain, SAN matchers, CRL of
the issuer), and the Pod Security labels the API server's admission reads."""

from __future__ import annotations

import copy
import datetime
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.k8s.manifests import PLATFORMS, render_cached

GROUP = "gateway.networking.k8s.io"
# Route kinds a listener takes when allowedRoutes.kinds is unset: Envoy Gateway (v1.9, gatewayapi/
# listener.go) takes both HTTPRoute and GRPCRoute on HTTP and HTTPS listeners.
DEFAULT_KINDS = {"HTTP": {"HTTPRoute", "GRPCRoute"}, "HTTPS": {"HTTPRoute", "GRPCRoute"}, "TLS": {"TLSRoute"}, "TCP": {"TCPRoute"}}


def gateway_objects() -> list[dict]:
    return copy.deepcopy(render_cached("overlays/gpu-gateway"))


def find(objects, kind, name=None):
    return next(o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name))


# --- which routes attach ------------------------------------------------------------------------

def listener_accepts(gateway: dict, route: dict) -> bool:
    """Does a listener of `gateway` take `route` (Gateway API: the route names the Gateway, and the
    listener if it gives a sectionName; the listener allows the route's kind and namespace)?"""
    namespace = gateway["metadata"].get("namespace")
    for parent in route["spec"].get("parentRefs", []):
        if parent["name"] != gateway["metadata"]["name"] or parent.get("namespace", route["metadata"].get("namespace")) != namespace:
            continue
        for listener in gateway["spec"]["listeners"]:
            if "sectionName" in parent and parent["sectionName"] != listener["name"]:
                continue
            allowed = listener.get("allowedRoutes", {})
            kinds = {k["kind"] for k in allowed.get("kinds", []) if k.get("group", GROUP) == GROUP} or DEFAULT_KINDS[listener["protocol"]]
            if route["kind"] not in kinds:
                continue
            scope = allowed.get("namespaces", {}).get("from", "Same")
            if scope == "All" or (scope == "Same" and route["metadata"].get("namespace") == namespace):
                return True
    return False


def catch_all_http_route(namespace: str = "histoserve") -> dict:
    """What anyone who may create routes in the namespace could add: every path to Triton, admin RPCs included."""
    return {"apiVersion": f"{GROUP}/v1", "kind": "HTTPRoute", "metadata": {"name": "shortcut", "namespace": namespace},
            "spec": {"parentRefs": [{"name": "triton", "namespace": "histoserve"}],
                     "rules": [{"backendRefs": [{"name": "triton-grpc", "port": 8001}]}]}}


def test_the_listener_takes_the_grpc_route_and_no_http_route():
    objects = gateway_objects()
    gateway = find(objects, "Gateway", "triton")
    assert listener_accepts(gateway, find(objects, "GRPCRoute", "triton"))
    assert not listener_accepts(gateway, catch_all_http_route())
    assert not listener_accepts(gateway, catch_all_http_route("tenant-b"))


def test_without_allowed_kinds_an_http_route_would_bypass_the_method_list():
    gateway = find(gateway_objects(), "Gateway", "triton")
    for listener in gateway["spec"]["listeners"]:
        listener["allowedRoutes"].pop("kinds")
    assert listener_accepts(gateway, catch_all_http_route())


# --- which client certificates pass --------------------------------------------------------------

NOW = datetime.datetime.now(datetime.timezone.utc)


def make_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(NOW - datetime.timedelta(days=1))
                   .not_valid_after(NOW + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA256()))
    return certificate, key


def make_client(ca: tuple, dns_name: str) -> x509.Certificate:
    certificate, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
            .issuer_name(certificate.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1)).not_valid_after(NOW + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False).sign(ca_key, hashes.SHA256()))


def make_crl(ca: tuple, revoked: list[x509.Certificate]) -> x509.CertificateRevocationList:
    certificate, key = ca
    builder = (x509.CertificateRevocationListBuilder().issuer_name(certificate.subject).last_update(NOW)
               .next_update(NOW + datetime.timedelta(days=1)))
    for cert in revoked:
        builder = builder.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                                                  .revocation_date(NOW).build())
    return builder.sign(key, hashes.SHA256())


def string_matches(matcher: dict, value: str) -> bool:
    kind, wanted = matcher.get("type", "Exact"), matcher["value"]
    return {"Exact": value == wanted, "Prefix": value.startswith(wanted), "Suffix": value.endswith(wanted),
            "RegularExpression": re.fullmatch(wanted, value) is not None}[kind]


def referenced(refs: list[dict], config_maps: dict[str, dict], key: str) -> list[bytes]:
    found = []
    for ref in refs:
        assert ref.get("kind", "Secret") == "ConfigMap", ref
        found.append(config_maps[ref["name"]][key])  # a missing ConfigMap: Envoy Gateway rejects the policy
    return found


def client_accepted(policy: dict, config_maps: dict[str, dict], certificate: x509.Certificate | None) -> bool:
    """Envoy's verdict on a client's leaf certificate under the ClientTrafficPolicy's clientValidation
    (a one-level chain, as our client CA issues): required unless optional; issued and signed by a CA
    of caCertificateRefs; inside its validity; some SAN matching some matcher when matchers are
    given; not revoked by its issuer's CRL, and refused when CRLs are configured but none is its
    issuer's (Envoy's CRL check needs one per CA)."""
    validation = policy["spec"]["tls"]["clientValidation"]
    if certificate is None:
        return validation.get("optional", False) or validation.get("mode") in ("Request", "VerifyIfGiven")
    cas = [x509.load_pem_x509_certificate(pem) for pem in referenced(validation["caCertificateRefs"], config_maps, "ca.crt")]
    issuer = next((ca for ca in cas if ca.subject == certificate.issuer), None)
    if issuer is None:
        return False
    try:
        certificate.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError: not this CA's
        return False
    if not validation.get("allowExpiredCertificate") and not certificate.not_valid_before_utc <= NOW <= certificate.not_valid_after_utc:
        return False
    matchers = validation.get("subjectAltNames", {})
    if any(matchers.values()):
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = {"dnsNames": sans.get_values_for_type(x509.DNSName), "uris": sans.get_values_for_type(x509.UniformResourceIdentifier),
                 "emailAddresses": sans.get_values_for_type(x509.RFC822Name),
                 "ipAddresses": [str(a) for a in sans.get_values_for_type(x509.IPAddress)]}
        if not any(string_matches(m, value) for kind, listed in matchers.items() for m in listed for value in names.get(kind, [])):
            return False
    if "crl" in validation:
        crls = [x509.load_pem_x509_crl(pem) for pem in referenced(validation["crl"]["refs"], config_maps, "ca.crl")]
        crl = next((c for c in crls if c.issuer == issuer.subject and c.is_signature_valid(issuer.public_key())), None)
        if crl is None or crl.get_revoked_certificate_by_serial_number(certificate.serial_number) is not None:
            return False
    return True


@pytest.fixture(scope="module")
def pki():
    ca, other_ca = make_ca("histoserve clients CA"), make_ca("some other CA")
    clients = {
        "scorer": make_client(ca, "scorer.clients.triton.example.com"),
        "wrong name": make_client(ca, "build-agent.ci.example.com"),       # the same CA signed it for something else
        "revoked": make_client(ca, "laptop.clients.triton.example.com"),
        "other CA": make_client(other_ca, "scorer.clients.triton.example.com"),
        "lookalike": make_client(ca, "scorer.clients.triton.example.com.evil.example"),
    }
    pem = serialization.Encoding.PEM
    config_maps = {"triton-client-ca": {"ca.crt": ca[0].public_bytes(pem)},
                   "triton-client-crl": {"ca.crl": make_crl(ca, [clients["revoked"]]).public_bytes(pem)}}
    return clients, config_maps


def verdicts(policy, pki) -> dict[str, bool]:
    clients, config_maps = pki
    return {name: client_accepted(policy, config_maps, cert) for name, cert in [*clients.items(), ("no certificate", None)]}


EXPECTED = {"scorer": True, "wrong name": False, "revoked": False, "other CA": False, "lookalike": False, "no certificate": False}


def test_only_a_named_unrevoked_client_of_our_ca_passes(pki):
    policy = find(gateway_objects(), "ClientTrafficPolicy", "triton")
    assert verdicts(policy, pki) == EXPECTED


@pytest.mark.parametrize("removed, admitted", [("subjectAltNames", ("wrong name", "lookalike")), ("crl", ("revoked",))])
def test_without_the_san_matchers_or_the_crl_a_wrong_client_passes(pki, removed, admitted):
    policy = find(gateway_objects(), "ClientTrafficPolicy", "triton")
    policy["spec"]["tls"]["clientValidation"].pop(removed)
    assert verdicts(policy, pki) == {**EXPECTED, **dict.fromkeys(admitted, True)}


def test_a_crl_configured_but_missing_for_the_issuer_refuses_every_client(pki):
    """Envoy refuses when no CRL of the chain's CA is loaded: publish one (empty is fine) before applying."""
    clients, config_maps = pki
    policy = find(gateway_objects(), "ClientTrafficPolicy", "triton")
    stranger_ca = make_ca("histoserve clients CA")  # the same name, another key: its CRL does not verify
    maps = {**config_maps, "triton-client-crl": {"ca.crl": make_crl(stranger_ca, []).public_bytes(serialization.Encoding.PEM)}}
    assert not client_accepted(policy, maps, clients["scorer"])


# --- Pod Security labels ------------------------------------------------------------------------

MODES = ("enforce", "warn", "audit")


def pod_security_problems(namespace: dict) -> list[str]:
    labels, name = namespace["metadata"].get("labels", {}), namespace["metadata"]["name"]
    problems = []
    for mode in MODES:
        level = labels.get(f"pod-security.kubernetes.io/{mode}")
        version = labels.get(f"pod-security.kubernetes.io/{mode}-version")
        if level != "restricted":
            problems.append(f"{name}: {mode} is {level!r}, not restricted")
        if not re.fullmatch(r"v1\.\d+", version or ""):  # absent means latest: the rules move with each upgrade
            problems.append(f"{name}: {mode}-version is {version!r}, not a pinned v1.N")
    if len({labels.get(f"pod-security.kubernetes.io/{m}-version") for m in MODES}) != 1:
        problems.append(f"{name}: enforce, warn and audit judge by different versions")
    return problems


def namespaces() -> list[dict]:
    return [o for p in PLATFORMS for o in render_cached(p) if o["kind"] == "Namespace"]


def test_every_namespace_enforces_warns_and_audits_restricted_at_a_pinned_version():
    assert {n["metadata"]["name"] for n in namespaces()} == {"histoserve", "histoserve-dev"}
    for namespace in namespaces():
        assert pod_security_problems(namespace) == []


@pytest.mark.parametrize("label, value", [("pod-security.kubernetes.io/audit", None), ("pod-security.kubernetes.io/warn", None),
                                          ("pod-security.kubernetes.io/enforce-version", "latest"),
                                          ("pod-security.kubernetes.io/enforce-version", None),
                                          ("pod-security.kubernetes.io/enforce", "baseline")])
def test_the_pod_security_check_notices_a_weakened_namespace(label, value):
    namespace = copy.deepcopy(namespaces()[0])
    if value is None:
        namespace["metadata"]["labels"].pop(label)
    else:
        namespace["metadata"]["labels"][label] = value
    assert pod_security_problems(namespace)
