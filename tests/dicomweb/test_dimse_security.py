"""Who may associate with the DICOM node: the called AE title must be ours, a calling AE title is honoured only
from the addresses and with the TLS client certificates bound to it, and DICOM TLS (PS3.15 Annex B, BCP 195)
identifies peers by certificate. Real peers: dcmtk's tools (with +tls) and pynetdicom (with an SSL context and a
second loopback source address)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicomweb.dimse.admission import Refusal, admit
from dicomweb.dimse.config import (
    LOOPBACK,
    ClientCertificate,
    DimseConfig,
    DimseConfigError,
    TlsConfig,
    dimse_config,
    parse_destinations,
    parse_peers,
    parse_tls,
)
from server.settings import Settings, SettingsError
from tests.conftest import free_port
from tests.support.dimse_util import TITLE, dcmtk, dimse_audit, dimse_port, require_dcmtk, start
from tests.support.factory import ct, part10
from tests.support.tls_certs import Authority, Issued

pytestmark = pytest.mark.timeout(180)
FIND = StudyRootQueryRetrieveInformationModelFind
MOVE = StudyRootQueryRetrieveInformationModelMove


def _logins(dsn: str, outcome: str) -> list[dict[str, Any]]:
    return [r for r in dimse_audit(dsn) if r["type"]["code"] == "110114" and r["outcome"] == outcome]


def _associate(
    port: int,
    calling: str,
    *,
    called: str = TITLE,
    source: str | None = None,
    tls: ssl.SSLContext | None = None,
    contexts: list[Any] | None = None,
) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate(
        "127.0.0.1",
        port,
        contexts=contexts or [build_context(Verification)],
        ae_title=called,
        bind_address=(source, 0) if source else None,
        tls_args=(tls, "127.0.0.1") if tls is not None else None,
    )


def _rejection(assoc: Any) -> tuple[int, int, int]:
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    return rj.result, rj.result_source, rj.diagnostic


# --- configuration and the admission rule, as pure functions ---


def test_peer_bindings_parse() -> None:
    old, anywhere, net, cert, both = parse_peers(
        "OLD=technologist,ANY=referring@*,NET=radiologist:rad-1@10.1.0.0/16@192.0.2.7@::1,"
        "CRT=technologist@cn:ct1.example@sha256:" + ":".join(["ab"] * 32) + ",BOTH=admin@cn:x@10.0.0.0/8"
    )
    assert old.networks == LOOPBACK and old.certificates == ()  # the form without bindings: loopback only
    assert anywhere.networks is None and anywhere.certificates == ()
    assert net.sub == "rad-1" and net.allows_address("10.1.200.3") and net.allows_address("192.0.2.7")
    assert net.allows_address("::1") and net.allows_address("::ffff:10.1.0.9") and not net.allows_address("10.2.0.1")
    assert cert.networks is None and [str(c) for c in cert.certificates] == ["cn:ct1.example", "sha256:" + "ab" * 32]
    assert both.networks is not None and not both.allows_address("127.0.0.1") and len(both.certificates) == 1
    for bad in (
        "X=technologist@10.1.2.3/16",  # host bits set: a typo, not a network
        "X=technologist@somehost",  # host names are not bindings (DNS is not proof of anything)
        "X=technologist@*@10.0.0.1",
        "X=technologist@sha256:abcd",
        "X=technologist@cn:",
    ):
        with pytest.raises(DimseConfigError):
            parse_peers(bad)
    (dest,) = parse_destinations("PACS@10.0.0.2:2762+tls")
    assert (dest.host, dest.port, dest.tls) == ("10.0.0.2", 2762, True)


def test_tls_settings_need_what_they_use(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("not read here")
    assert parse_tls() is None
    tls = parse_tls(str(pem), str(pem), str(pem))
    assert tls is not None and (tls.port, tls.client_certificates, tls.only) == (2762, "required", True)
    plain_too = parse_tls(str(pem), str(pem), "", "11113", "", "false")
    assert plain_too is not None and plain_too.client_certificates == "off" and not plain_too.only
    for args in (
        (str(pem), "", ""),  # a certificate without its key
        (str(pem), str(pem), "", "", "required"),  # client certificates without a CA to verify them
        (str(tmp_path / "missing.pem"), str(pem), ""),
        ("", "", "", "", "required"),
    ):
        with pytest.raises(DimseConfigError):
            parse_tls(*args)
    with pytest.raises(DimseConfigError, match="bound to a certificate"):
        dimse_config("CT1=technologist@cn:ct1")  # no TLS listener to present it to
    with pytest.raises(DimseConfigError, match="needs HOUNSFIELD_DIMSE_TLS_CA"):
        dimse_config("CT1=technologist", "PACS@10.0.0.2:2762+tls")


def test_tls_environment_variables(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("read when the AE starts")
    env = {
        "HOUNSFIELD_DIMSE_TLS_CERT": str(pem),
        "HOUNSFIELD_DIMSE_TLS_KEY": str(pem),
        "HOUNSFIELD_DIMSE_TLS_CA": str(pem),
        "HOUNSFIELD_DIMSE_TLS_PORT": "11113",
        "HOUNSFIELD_DIMSE_PEERS": "CT1=technologist@cn:ct1,WS1=radiologist@10.0.0.0/8",
        "HOUNSFIELD_DIMSE_DESTINATIONS": "PACS@10.0.0.2:2762+tls",
    }
    tls = Settings.from_env(env).dimse.tls
    assert tls is not None and (tls.port, tls.client_certificates, tls.only) == (11113, "required", True)
    for variable, value in (("HOUNSFIELD_DIMSE_TLS_CLIENT_CERTS", "sometimes"), ("HOUNSFIELD_DIMSE_TLS_CA", "")):
        with pytest.raises(SettingsError, match=r"^HOUNSFIELD_DIMSE_TLS"):
            Settings.from_env({**env, variable: value})
    with pytest.raises(SettingsError, match=r"^HOUNSFIELD_DIMSE_PEERS"):
        Settings.from_env({"HOUNSFIELD_DIMSE_PEERS": "CT1=technologist@ct1.example"})


def test_admission_rule() -> None:
    config = DimseConfig(parse_peers("CT1=technologist,WS1=radiologist@10.0.0.0/8,CRT=auditor@cn:crt"))
    ct1 = ClientCertificate(("crt",), "0" * 64)

    def decide(calling: str, address: str, called: str = TITLE, cert: ClientCertificate | None = None) -> Any:
        result = admit(config, TITLE, calling=calling, called=called, address=address, certificate=cert)
        return result.diagnostic if isinstance(result, Refusal) else result.ae_title

    assert decide("CT1", "127.0.0.1") == "CT1"
    assert decide("CT1", "203.0.113.5") == 3  # an unbound peer from another host
    assert decide("WS1", "10.9.8.7") == "WS1" and decide("WS1", "127.0.0.1") == 3
    assert decide("CT1", "127.0.0.1", called="OTHER") == 7
    assert decide("NOBODY", "127.0.0.1") == 3
    assert decide("CRT", "198.51.100.1", cert=ct1) == "CRT"  # a certificate-bound peer from any address
    assert decide("CRT", "198.51.100.1") == 3  # ...but not without its certificate
    assert decide("CT1", "127.0.0.1", cert=ct1) == 3  # CRT's certificate cannot claim another title


# --- the plain listener: called AE title and address bindings ---


@pytest.fixture
def bound(make_server: Any) -> Any:
    require_dcmtk()
    peers = "CT1=technologist@127.0.0.1,WS1=radiologist@127.0.0.2,ANY=referring:dr-who@*,LOCAL=technologist"
    return start(make_server, peers=peers)


def test_the_called_ae_title_must_be_ours(bound: Any) -> None:
    port = dimse_port(bound)
    run = dcmtk("echoscu", "-aet", "CT1", "-aec", "WRONGAE", "127.0.0.1", str(port))
    assert run.returncode != 0
    assert "Called AE Title Not Recognized" in run.stdout + run.stderr
    assert _rejection(_associate(port, "CT1", called="WRONGAE")) == (1, 1, 7)
    assert dcmtk("echoscu", "-aet", "CT1", "-aec", TITLE, "127.0.0.1", str(port)).returncode == 0
    rejected = _logins(bound.dsn, "4")
    assert len(rejected) == 2
    assert all(r["agent"]["ae_title"] == "CT1" and r["agent"]["address"] == "127.0.0.1" for r in rejected)
    assert all("called AE title not recognized: 'WRONGAE'" in r["outcome_desc"] for r in rejected)


def test_a_calling_ae_title_is_honoured_only_from_its_addresses(bound: Any) -> None:
    port = dimse_port(bound)
    # WS1 is bound to 127.0.0.2: from 127.0.0.1 (dcmtk and pynetdicom) it is refused, from 127.0.0.2 accepted
    run = dcmtk("echoscu", "-aet", "WS1", "-aec", TITLE, "127.0.0.1", str(port))
    assert run.returncode != 0 and "Calling AE Title Not Recognized" in run.stdout + run.stderr
    assert _rejection(_associate(port, "WS1")) == (1, 1, 3)
    ws1 = _associate(port, "WS1", source="127.0.0.2")
    assert ws1.is_established
    ws1.release()
    # CT1 is bound to 127.0.0.1; LOCAL (no binding) to loopback, ANY to every address
    assert _rejection(_associate(port, "CT1", source="127.0.0.2")) == (1, 1, 3)
    for calling in ("LOCAL", "ANY"):
        assoc = _associate(port, calling, source="127.0.0.2")
        assert assoc.is_established, calling
        assoc.release()
    rejected = _logins(bound.dsn, "4")
    assert [(r["agent"]["ae_title"], r["agent"]["address"]) for r in rejected] == [
        ("WS1", "127.0.0.1"),
        ("WS1", "127.0.0.1"),
        ("CT1", "127.0.0.2"),
    ]
    assert all("address is not bound" in r["outcome_desc"] and "sub" not in r["agent"] for r in rejected)
    accepted = _logins(bound.dsn, "0")
    assert ("WS1", "127.0.0.2", "WS1") in {
        (r["agent"]["ae_title"], r["agent"]["address"], r["agent"].get("sub")) for r in accepted
    }


# --- DICOM TLS ---


class Pki:
    def __init__(self, folder: Path) -> None:
        self.ca = Authority(folder / "ca")
        self.server = self.ca.issue("hounsfield")
        self.ct1 = self.ca.issue("ct1")
        self.aud = self.ca.issue("aud")
        self.ref = self.ca.issue("ref")
        self.store = self.ca.issue("storescp")
        self.rogue = Authority(folder / "rogue", "Rogue CA").issue("ct1")  # right name, wrong CA

    def context(self, client: Issued | None) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca.pem))
        if client is not None:
            context.load_cert_chain(client.cert, client.key)
        return context

    def dcmtk(self, client: Issued) -> list[str]:
        return ["+tls", str(client.key), str(client.cert), "+cf", str(self.ca.pem)]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def storescp_tls(tmp_path: Path, pki: Pki) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp on TLS, requiring a client certificate from the CA."""
    require_dcmtk()
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    args = ["storescp", *pki.dcmtk(pki.store), "-aet", "STORE", "-od", str(out), str(port)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while dcmtk("echoscu", *pki.dcmtk(pki.ct1), "-aec", "STORE", "127.0.0.1", str(port)).returncode != 0:
            assert time.monotonic() < deadline and proc.poll() is None, "storescp did not start"
            time.sleep(0.1)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def tls_node(make_server: Any, pki: Pki, storescp_tls: tuple[int, Path]) -> Any:
    tls = TlsConfig(
        cert=pki.server.cert, key=pki.server.key, ca=pki.ca.pem, port=free_port(), client_certificates="required"
    )
    peers = f"CT1=technologist@cn:ct1,AUD=auditor@cn:aud,REF=referring:dr-who@sha256:{pki.ref.sha256},RAD=radiologist"
    routes = '[{"destination": "STORE", "calling_ae": "CT1"}]'
    node = start(
        make_server, peers=peers, tls=tls, destinations=f"STORE@127.0.0.1:{storescp_tls[0]}+tls", routes=routes
    )
    node.tls_port = tls.port
    return node


def test_tls_only_refuses_plain_text_and_clients_without_a_good_certificate(tls_node: Any, pki: Pki) -> None:
    port = str(tls_node.tls_port)
    with pytest.raises(OSError):  # TLS only: the plain listener does not run
        socket.create_connection(("127.0.0.1", dimse_port(tls_node)), timeout=5).close()
    plain = dcmtk("echoscu", "-aet", "CT1", "-aec", TITLE, "127.0.0.1", port)
    assert plain.returncode != 0
    anonymous = dcmtk("echoscu", "+tla", "+cf", str(pki.ca.pem), "-aet", "CT1", "-aec", TITLE, "127.0.0.1", port)
    assert anonymous.returncode != 0  # no client certificate: the handshake fails
    rogue = dcmtk("echoscu", *pki.dcmtk(pki.rogue), "-aet", "CT1", "-aec", TITLE, "127.0.0.1", port)
    assert rogue.returncode != 0  # "CN=ct1", but not from the configured CA
    # a client that connects and never says hello holds up no one (handshakes run outside the accept loop)
    with socket.create_connection(("127.0.0.1", tls_node.tls_port), timeout=5):
        good = dcmtk("echoscu", *pki.dcmtk(pki.ct1), "-aet", "CT1", "-aec", TITLE, "127.0.0.1", port, timeout=5)
    assert good.returncode == 0, good.stdout + good.stderr
    deadline = time.monotonic() + 10  # each failure is recorded in its connection's thread, after the client left
    while len(failures := [r for r in _logins(tls_node.dsn, "4") if "TLS handshake" in r["outcome_desc"]]) < 3:
        assert time.monotonic() < deadline, failures
        time.sleep(0.05)
    assert all(r["agent"]["address"] == "127.0.0.1" and "ae_title" not in r["agent"] for r in failures)
    reasons = " ".join(r["outcome_desc"] for r in failures)
    assert "WRONG_VERSION_NUMBER" in reasons  # plain text
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reasons and "CERTIFICATE_VERIFY_FAILED" in reasons
    (login,) = [r for r in _logins(tls_node.dsn, "0") if r["subtype"][0]["code"] == "110122"]
    assert (login["agent"]["ae_title"], login["agent"]["sub"]) == ("CT1", "CT1")


def test_the_certificate_is_the_identity(tls_node: Any, pki: Pki) -> None:
    port = tls_node.tls_port
    contexts = [build_context(FIND)]
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientID = "STUDY", ""
    # AUD's certificate: the auditor's roles, which may not search images
    assoc = _associate(port, "AUD", tls=pki.context(pki.aud), contexts=contexts)
    assert assoc.is_established
    statuses = [int(status.Status) for status, _ in assoc.send_c_find(query, FIND)]
    assoc.release()
    assert statuses == [0x0124]
    # ...and it cannot claim the radiologist's AE title (RAD is bound to no certificate, AUD's is bound to AUD)
    assert _rejection(_associate(port, "RAD", tls=pki.context(pki.aud), contexts=contexts)) == (1, 1, 3)
    # CT1 is bound to its certificate: another valid certificate does not make an association CT1
    assert _rejection(_associate(port, "CT1", tls=pki.context(pki.aud))) == (1, 1, 3)
    # REF is bound by fingerprint: its searches run as dr-who
    assoc = _associate(port, "REF", tls=pki.context(pki.ref), contexts=contexts)
    assert assoc.is_established
    statuses = [int(status.Status) for status, _ in assoc.send_c_find(query, FIND)]
    assoc.release()
    assert statuses == [0]
    # the called AE title is checked over TLS too
    assert _rejection(_associate(port, "REF", called="WRONGAE", tls=pki.context(pki.ref))) == (1, 1, 7)
    reasons = [r["outcome_desc"] for r in _logins(tls_node.dsn, "4")]
    assert any("certificate is bound to AUD" in r for r in reasons)
    finds = dimse_audit(tls_node.dsn, "C-FIND")
    assert {(r["agent"]["ae_title"], r["agent"]["sub"], r["outcome"]) for r in finds} == {
        ("AUD", "AUD", "4"),
        ("REF", "dr-who", "0"),
    }


def test_outgoing_associations_use_tls_to_tls_destinations(
    tls_node: Any, pki: Pki, storescp_tls: tuple[int, Path], tmp_path: Path
) -> None:
    """A routed instance and a C-MOVE reach dcmtk's storescp over TLS (it requires the server's certificate)."""
    received = storescp_tls[1]
    ds = ct(generate_uid(), PatientID="P1")
    path = tmp_path / "in.dcm"
    path.write_bytes(part10(ds))
    port = str(tls_node.tls_port)
    stored = dcmtk("storescu", *pki.dcmtk(pki.ct1), "-aet", "CT1", "-aec", TITLE, "127.0.0.1", port, path)
    assert stored.returncode == 0, stored.stdout + stored.stderr

    def arrived() -> list[Path]:
        deadline = time.monotonic() + 30
        while not (files := list(received.iterdir())):
            assert time.monotonic() < deadline, "nothing arrived at the TLS destination"
            time.sleep(0.1)
        return files

    (routed,) = arrived()  # the routing rule for CT1's instances
    assert pydicom.dcmread(routed).SOPInstanceUID == ds.SOPInstanceUID
    routed.unlink()
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ds.StudyInstanceUID
    assoc = _associate(tls_node.tls_port, "CT1", tls=pki.context(pki.ct1), contexts=[build_context(MOVE)])
    assert assoc.is_established  # (dcmtk's movescu has no TLS options)
    statuses = [int(status.Status) for status, _ in assoc.send_c_move(query, "STORE", MOVE)]
    assoc.release()
    assert statuses[-1] == 0, [hex(s) for s in statuses]
    (moved,) = arrived()
    assert pydicom.dcmread(moved).SOPInstanceUID == ds.SOPInstanceUID
