"""pipeline.artifact.version_tags: a version's own tag wins over its training run's, asked by URI (predict, evaluate,
explain) or by run and model name (the served pyfunc), on a real SQLite MLflow store."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.artifact import version_tags

NAME = "tags-model"


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # both: what version_tags' MlflowClient() reads (conftest restores them after)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    exp = client.create_experiment("tags", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    for key, value in {"threshold": "0.3", "temperature": "1.5", "dataset_digest": "abc"}.items():
        client.set_tag(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    client.create_registered_model(NAME)
    source = f"runs:/{run.info.run_id}/model"
    first = client.create_model_version(NAME, source, run_id=run.info.run_id)
    # promotion re-fitted the threshold and recorded the artifact hash on the version only
    client.set_model_version_tag(NAME, first.version, "threshold", "0.4")
    client.set_model_version_tag(NAME, first.version, "model_sha256", "f" * 64)
    client.set_registered_model_alias(NAME, "champion", first.version)
    return client, run.info.run_id


def test_the_version_tag_wins_over_the_run_tag_by_uri_and_by_run(store):
    _, run_id = store
    by_alias = version_tags.of_uri(f"models:/{NAME}@champion")
    by_version = version_tags.of_uri(f"models:/{NAME}/1")
    by_run = version_tags.of_run(run_id, NAME)
    assert by_alias.uri == by_version.uri == f"models:/{NAME}/1"  # the alias pinned to the version it named
    for found in (by_alias, by_version, by_run):
        assert (found.run_id, found.version) == (run_id, "1")
        assert found.get("threshold") == "0.4"  # the version's, not the run's 0.3
        assert found.get("temperature") == "1.5"  # only on the run: inherited
        assert found.own == {"threshold": "0.4", "model_sha256": "f" * 64}


def test_a_run_uri_or_an_unregistered_name_has_only_the_runs_tags(store):
    _, run_id = store
    for found in (version_tags.of_uri(f"runs:/{run_id}/model"), version_tags.of_run(run_id, "other-model"),
                  version_tags.of_run(run_id, None)):
        assert (found.run_id, found.version, found.own) == (run_id, None, {})
        assert found.get("threshold") == "0.3"
    nothing = version_tags.of_run(None, NAME)
    assert (nothing.run_id, nothing.version, nothing.tags) == (None, None, {})


def test_a_run_registered_twice_answers_with_its_newest_version(store):
    client, run_id = store
    second = client.create_model_version(NAME, f"runs:/{run_id}/model", run_id=run_id)
    client.set_model_version_tag(NAME, second.version, "threshold", "0.45")
    found = version_tags.of_run(run_id, NAME)
    assert (found.version, found.get("threshold")) == ("2", "0.45")
    assert version_tags.of_uri(f"models:/{NAME}@champion").get("threshold") == "0.4"  # the alias still on 1


def test_a_missing_version_raises_mlflows_error_for_the_caller_to_name(store):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as e:
        version_tags.of_uri(f"models:/{NAME}/9")
    assert e.value.error_code == "RESOURCE_DOES_NOT_EXIST"
