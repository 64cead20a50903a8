"""Bearer-token auth and TLS / mutual TLS, over real loopback channels; certificates made in the test."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from indexing.build import build_index
from serving.app import build_service
from serving.client import ClientTls, RetrievalClient
from serving.errors import RetrievalRpcError
from serving.onnx_export import run_export
from serving.server import start_server
from towerline.cli import app
from towerline.config import ServeConfig, TowerlineConfig
from towerline.errors import ConfigError
from training.run import init_dual_encoder

runner = CliRunner()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer_key, issuer_name: x509.Name, *, ca: bool, key=None, san: bool = False):
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, builder.sign(issuer_key or key, hashes.SHA256())


def _write(directory: Path, name: str, key, cert) -> tuple[Path, Path]:
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by the CA, and a
    stranger's self-signed client certificate."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    _, ca_cert = _issue("towerline test CA", None, _name("towerline test CA"), ca=True, key=ca_key)
    _, ca_path = _write(directory, "ca", ca_key, ca_cert)
    server_key, server_cert = _issue("127.0.0.1", ca_key, ca_cert.subject, ca=False, san=True)
    client_key, client_cert = _issue("client", ca_key, ca_cert.subject, ca=False)
    stranger_key, stranger_cert = _issue("stranger", None, _name("stranger"), ca=False)
    paths = {"ca": ca_path}
    for name, key, cert in (("server", server_key, server_cert), ("client", client_key, client_cert),
                            ("stranger", stranger_key, stranger_cert)):
        paths[f"{name}_key"], paths[f"{name}_cert"] = _write(directory, name, key, cert)
    return paths


@pytest.fixture()
def artifacts(tiny_config: TowerlineConfig, tmp_path: Path) -> tuple[Path, Path]:
    init_dual_encoder(tiny_config, tmp_path / "encoder")
    run_export(tiny_config, tmp_path / "encoder", tmp_path / "onnx")
    build_index(tiny_config, tmp_path / "encoder", tmp_path / "index")
    return tmp_path / "index", tmp_path / "onnx"


def _serving(config: TowerlineConfig, artifacts: tuple[Path, Path], serve: ServeConfig) -> Iterator[str]:
    server, port = start_server(build_service(config, *artifacts), serve)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_a_token_is_required_when_configured_and_health_stays_open(
    tiny_config: TowerlineConfig, artifacts: tuple[Path, Path], tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("s3cret-token\n")
    serve = tiny_config.serve.model_copy(update={"port": 0, "auth_token_file": tmp_path / "token"})
    for address in _serving(tiny_config, artifacts, serve):
        with RetrievalClient(address) as anonymous:
            assert anonymous.health() == "SERVING"  # probes need no secret
            with pytest.raises(RetrievalRpcError) as missing:
                anonymous.search("alpha", 3)
            assert missing.value.code == "UNAUTHENTICATED"
        with RetrievalClient(address, token="wrong") as wrong, pytest.raises(RetrievalRpcError) as denied:
            wrong.info()
        assert denied.value.code == "PERMISSION_DENIED"
        with RetrievalClient(address, token="s3cret-token") as allowed:
            assert len(allowed.search("alpha", 3)) == 3 and allowed.info().count > 0
        # The CLI: --token-file, and a one-line error without it.
        dataset = f"data.dir={tiny_config.data.dir}"
        found = runner.invoke(app, ["search", "alpha", "--address", address, "-k", "2", "--token-file",
                                    str(tmp_path / "token"), dataset])
        assert found.exit_code == 0, found.output
        refused = runner.invoke(app, ["search", "alpha", "--address", address, dataset])
        assert refused.exit_code == 2 and "UNAUTHENTICATED" in refused.stderr
    # Off by default: the same calls without a token succeed.
    for address in _serving(tiny_config, artifacts, tiny_config.serve.model_copy(update={"port": 0})):
        with RetrievalClient(address) as anonymous:
            assert len(anonymous.search("alpha", 3)) == 3
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ConfigError, match=r"auth_token_file.*empty"):
        start_server(build_service(tiny_config, *artifacts),
                     tiny_config.serve.model_copy(update={"port": 0, "auth_token_file": tmp_path / "empty"}))


def test_tls_and_mutual_tls(tiny_config: TowerlineConfig, artifacts: tuple[Path, Path], pki: dict[str, Path]) -> None:
    tls = tiny_config.serve.model_copy(update={"port": 0, "tls_cert_file": pki["server_cert"],
                                               "tls_key_file": pki["server_key"]})
    for address in _serving(tiny_config, artifacts, tls):
        with RetrievalClient(address, tls=ClientTls(pki["ca"])) as client:
            assert len(client.search("alpha", 3)) == 3
        with RetrievalClient(address, timeout_s=3) as plaintext, pytest.raises(RetrievalRpcError) as refused:
            plaintext.search("alpha", 3)
        assert refused.value.code == "UNAVAILABLE"

    mutual = tls.model_copy(update={"tls_client_ca_file": pki["ca"]})
    for address in _serving(tiny_config, artifacts, mutual):
        with RetrievalClient(address, tls=ClientTls(pki["ca"], pki["client_cert"], pki["client_key"])) as client:
            assert len(client.search("alpha", 3)) == 3
        for anonymous in (ClientTls(pki["ca"]), ClientTls(pki["ca"], pki["stranger_cert"], pki["stranger_key"])):
            with RetrievalClient(address, timeout_s=3, tls=anonymous) as client, \
                    pytest.raises(RetrievalRpcError) as refused:
                client.search("alpha", 3)
            assert refused.value.code == "UNAVAILABLE"

    with pytest.raises(ConfigError, match=r"both serve\.tls_cert_file and serve\.tls_key_file"):
        start_server(build_service(tiny_config, *artifacts),
                     tiny_config.serve.model_copy(update={"port": 0, "tls_cert_file": pki["server_cert"]}))


def test_no_artifact_is_unpickled() -> None:
    """Artifacts may come from elsewhere: weights load from safetensors, arrays with numpy's default
    allow_pickle=False, BM25 with allow_pickle=False. Any call that would unpickle a file fails here."""
    import ast

    root = Path(__file__).resolve().parents[1]
    packages = ("towerline", "pipelines", "training", "distill", "personalization", "indexing", "serving",
                "evaluation", "benchmarks")
    found = []
    for path in sorted(file for package in packages for file in (root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            callee = ast.unparse(node.func)
            keywords = {keyword.arg: ast.unparse(keyword.value) for keyword in node.keywords}
            unsafe = (callee in ("pickle.load", "pickle.loads", "joblib.load", "dill.load", "cloudpickle.load")
                      or (callee == "torch.load" and keywords.get("weights_only") != "True")
                      or keywords.get("allow_pickle") == "True")
            if unsafe:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not found, found
