"""`pneumo serve` (pipeline/serve.py, pipeline/artifact/model_store.py: verified_copy): every file of the version
checked against the hash promotion recorded before any of it is read, fail closed; bounded requests answered or
refused with one line; the private copy deleted when the server stops."""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

pytest_plugins = ["fixtures_registry"]
MODEL = "pneumonia-cnn"
pytestmark = pytest.mark.slow


@pytest.fixture()
def promoted(registry_store, tmp_path):
    """@champion on version 3 with the artifact hash promotion records, and the version's store folder. The
    per-test store copies share their artifact files with every other test: a test that tampers with them gets
    them restored afterwards."""
    import shutil

    import mlflow
    from mlflow import MlflowClient

    from pipeline.artifact import tag_keys, tracking
    from pipeline.promote.promotion import model_sha256

    s = registry_store
    tracking.setup(s.uri)
    client = MlflowClient(s.uri, s.uri)
    v = s.versions[2]
    client.set_registered_model_alias(MODEL, "champion", v)
    client.set_model_version_tag(MODEL, v, tag_keys.MODEL_SHA256, model_sha256(MODEL, v))
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{v}"))  # the store's own folder
    backup = tmp_path / "artifact-backup"
    shutil.copytree(folder, backup)
    try:
        yield s, v, client, folder
    finally:
        shutil.rmtree(folder)
        shutil.copytree(backup, folder)


def test_a_promoted_version_is_verified_into_a_private_folder_and_cleaned_up(promoted):
    from pipeline.artifact import tag_keys
    from pipeline.artifact.integrity import artifact_sha256
    from pipeline.artifact.model_store import verified_copy

    s, v, client, _ = promoted
    verified = verified_copy(f"models:/{MODEL}@champion", s.uri)
    try:
        assert verified.uri == f"models:/{MODEL}/{v}" and verified.version == v
        tags = client.get_model_version(MODEL, v).tags  # the decision travels with the files, as registered
        assert (verified.threshold, verified.temperature) == (float(tags[tag_keys.THRESHOLD]),
                                                              float(tags[tag_keys.TEMPERATURE]))
        assert artifact_sha256(verified.folder) == tags[tag_keys.MODEL_SHA256]  # the files promotion hashed
        root = next(p for p in [verified.folder, *verified.folder.parents] if p.name.startswith("pneumo-serve-"))
        assert oct(root.stat().st_mode & 0o777) == "0o700"  # this user only
    finally:
        verified.close()
    assert not verified.folder.exists()


def test_a_tampered_code_file_is_refused_before_it_runs(promoted, tmp_path):
    """A payload written into the artifact's copy of the package (what a writer of the artifact store could do):
    refused on the hash, and the payload never ran."""
    from pipeline.artifact.integrity import ModelIntegrityError
    from pipeline.artifact.model_store import verified_copy

    s, _, _, folder = promoted
    marker = tmp_path / "payload-ran"
    code = folder / "code" / "pipeline" / "artifact" / "serving.py"
    code.write_text(f"open({str(marker)!r}, 'w').write('pwned')\n" + code.read_text())
    with pytest.raises(ModelIntegrityError, match="changed since promotion"):
        verified_copy(f"models:/{MODEL}@champion", s.uri)
    assert not marker.exists()


def test_a_tampered_network_or_settings_file_is_refused(promoted):
    from pipeline.artifact.integrity import ModelIntegrityError
    from pipeline.artifact.model_store import verified_copy

    s, _, _, folder = promoted
    settings = folder / "data" / "pneumo" / "settings.json"
    decision = json.loads(settings.read_text())
    settings.write_text(json.dumps({**decision, "threshold": 0.0001}))  # every case positive
    with pytest.raises(ModelIntegrityError, match="changed since promotion"):
        verified_copy(f"models:/{MODEL}@champion", s.uri)
    settings.write_text(json.dumps(decision))
    network = folder / "data" / "pneumo" / "model.keras"
    network.write_bytes(network.read_bytes() + b"\0")
    with pytest.raises(ModelIntegrityError, match="changed since promotion"):
        verified_copy(f"models:/{MODEL}@champion", s.uri)


def test_an_unverifiable_or_unusable_version_is_refused(promoted):
    """Fail closed: no recorded hash; an edited threshold tag; a threshold or temperature outside its range (even
    with a hash recorded over it); no such alias."""
    from pipeline.artifact import tag_keys
    from pipeline.artifact.integrity import ModelIntegrityError, artifact_sha256
    from pipeline.artifact.model_store import ModelError, verified_copy

    s, v, client, folder = promoted
    champion = f"models:/{MODEL}@champion"
    client.set_model_version_tag(MODEL, v, tag_keys.THRESHOLD, "0.0001")
    with pytest.raises(ModelIntegrityError, match=r"tag threshold=0.0001 differs from the .* its artifact carries"):
        verified_copy(champion, s.uri)
    client.delete_model_version_tag(MODEL, v, tag_keys.THRESHOLD)

    settings = folder / "data" / "pneumo" / "settings.json"
    decision = json.loads(settings.read_text())
    for bad, reason in (({"threshold": float("nan")}, r"threshold nan is not in \(0, 1\)"),
                        ({"temperature": -1.0}, r"temperature -1.0 is not finite and > 0")):
        settings.write_text(json.dumps({**decision, **bad}))
        client.set_model_version_tag(MODEL, v, tag_keys.MODEL_SHA256, artifact_sha256(folder))
        with pytest.raises(ModelIntegrityError, match=reason):
            verified_copy(champion, s.uri)
    settings.write_text(json.dumps(decision))

    client.delete_model_version_tag(MODEL, v, tag_keys.MODEL_SHA256)
    with pytest.raises(ModelIntegrityError, match="no `model_sha256` recorded on the version"):
        verified_copy(champion, s.uri)
    with pytest.raises(ModelError, match="could not be read"):
        verified_copy(f"models:/{MODEL}@no-such-alias", s.uri)
    with pytest.raises(ModelError, match="serves a registered version"):
        verified_copy("runs:/abc/model", s.uri)


class _Serve:
    """`pneumo serve` in its own process group, ready once /ping answers (pipeline.ui.ManagedServer)."""

    def __new__(cls, tracking_uri: str, tmp: Path, *flags: str):
        from pipeline.ui import ManagedServer

        class Server(ManagedServer):
            name = "pneumo serve"
            health_path = "/ping"

            def command(self):
                return [os.path.join(os.path.dirname(sys.executable), "pneumo"), "serve", "--port", str(self.port),
                        "--tracking-uri", tracking_uri, *flags]

            def env(self):
                return {**os.environ, "TMPDIR": str(tmp), "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}

        return Server(startup_timeout=300, log_file=tmp / "serve.log")


def _post(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_pneumo_serve_answers_rows_and_refuses_oversized_requests_with_one_line(promoted, tmp_path):
    import mlflow
    import pandas as pd

    from pipeline.data.synth import example_dicom_bytes

    s, v, _, _ = promoted
    private = tmp_path / "tmp"
    private.mkdir()
    server = _Serve(s.uri, private, "--max-body", "200000")
    dicom = base64.b64encode(example_dicom_bytes()).decode()
    try:
        server.start()
        assert [p.name for p in private.iterdir() if p.name.startswith("pneumo-serve-")], "a private copy is served"
        status, body = _post(server.url, json.dumps({"dataframe_records": [{"dicom": dicom}, {"dicom": "%%"}]}).encode())
        assert status == 200, body
        answers = body["predictions"]
        assert [a["status"] for a in answers] == ["ok", "error"] and answers[0]["model_version"] == v
        assert answers[1]["error"] == "dicom: not valid base64"
        # The verified copy answers what the registered version answers in-process: the calibrated probability.
        direct = mlflow.pyfunc.load_model(f"models:/{MODEL}/{v}").predict(pd.DataFrame([{"dicom": dicom}]))
        assert answers[0]["probability"] == pytest.approx(direct.loc[0, "probability"], rel=1e-5, abs=1e-6)
        assert answers[0]["prediction"] == direct.loc[0, "prediction"]

        status, body = _post(server.url, json.dumps({"dataframe_records": [{"dicom": "AAAA"}] * 65}).encode())
        assert status == 400 and set(body) == {"error_code", "message"}, body  # no stack_trace, no echo
        assert body["message"].startswith("65 rows in one request, over the limit of 64")

        status, body = _post(server.url, b"x" * 200001)
        assert status == 413 and "over the limit of 200000 bytes" in body["message"]
        status, body = _post(server.url, b"{not json")
        assert status == 400 and set(body) == {"error_code", "message"} and "\n" not in body["message"]
    finally:
        server.stop()
    assert server.proc is None
    assert not [p for p in private.iterdir() if p.name.startswith("pneumo-serve-")], "the private copy is deleted"
    log = (private / "serve.log").read_text()
    assert f"models:/{MODEL}/{v} verified" in log


def test_pneumo_serve_refuses_to_start_on_an_unpromoted_version(registry_store, tmp_path, capsys):
    from pipeline.cli import main

    s = registry_store
    code = main(["serve", "--model", f"models:/{MODEL}/{s.versions[0]}", "--tracking-uri", s.uri])
    err = capsys.readouterr().err
    assert code == 1 and "never promoted" in err and "Traceback" not in err


def test_generate_dockerfile_packs_the_champion_as_promoted(promoted, tmp_path):
    """`mlflow models generate-dockerfile` on the champion: a Dockerfile that serves the pyfunc, and the model
    folder it copies into the image hashes to what promotion recorded (the image holds the promoted files)."""
    import subprocess

    from pipeline.artifact import tag_keys
    from pipeline.artifact.integrity import artifact_sha256

    s, v, client, _ = promoted
    out = tmp_path / "image"
    env = {**os.environ, "MLFLOW_TRACKING_URI": s.uri, "MLFLOW_REGISTRY_URI": s.uri}
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "generate-dockerfile",
                           "-m", f"models:/{MODEL}@champion", "-d", str(out)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dockerfile = (out / "Dockerfile").read_text()
    assert "COPY model_dir /opt/ml/model" in dockerfile and "_serve(" in dockerfile
    recorded = client.get_model_version(MODEL, v).tags[tag_keys.MODEL_SHA256]
    assert artifact_sha256(out / "model_dir") == recorded
    assert (out / "model_dir" / "code" / "pipeline" / "artifact" / "serving.py").is_file()


def test_loading_a_model_leaves_no_copy_in_the_temporary_folder(registry_store, tmp_path, monkeypatch):
    """predict, evaluate and explain load through model_store.load: the download is deleted once the network is
    in memory (every load once left a copy of the model in the system temporary folder)."""
    import tempfile

    from pipeline.artifact.model_store import load

    s = registry_store
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    lm = load(f"models:/{MODEL}/{s.versions[0]}", s.uri)
    assert lm.model.inputs[0].shape[1] == 64
    assert not [p.name for p in private.iterdir() if p.name.startswith("pneumo-model-")]
