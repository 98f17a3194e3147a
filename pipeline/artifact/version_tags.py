"""What travels with a model version: its tags over its training run's.

Training tags its run (`threshold`, `temperature`, `dataset_digest`); promotion may re-fit and re-tag the
registered version, and records `model_sha256` on the version only. So a version's own tag wins over its run's.
One home for that rule, read by both loaders: `pipeline.artifact.model_store` (predict, evaluate, explain) asks by model
URI, `pipeline.artifact.serving` (the pyfunc, which knows only the run it was logged from) asks by run and model name.
Below both on purpose (MLflow only), so neither loader imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class VersionTags:
    run_id: str | None  # the training run behind the model; None when the URI names none
    version: str | None  # "3" for a registered version; None for `runs:/` and `models:/m-<id>` URIs
    own: dict = field(default_factory=dict)  # the version's own tags (`model_sha256` lives only here)
    tags: dict = field(default_factory=dict)  # the version's tags over its run's: what the model carries
    uri: str = ""  # the model URI pinned to what was found: an alias resolved once, to `models:/<name>/<version>`

    def get(self, name: str) -> str | None:
        return self.tags.get(name)


def _with_run(client, run_id: str | None, version: str | None, own: dict, uri: str = "") -> VersionTags:
    run_tags = dict(client.get_run(run_id).data.tags) if run_id else {}
    return VersionTags(run_id=run_id, version=version, own=own, tags={**run_tags, **own}, uri=uri)


def of_uri(uri: str) -> VersionTags:
    """The tags behind a model URI: `models:/<name>@<alias>`, `models:/<name>/<version>`, `runs:/<id>/...` or
    MLflow 3's logged-model id `models:/m-<id>` (the last two have no version, so only the run's tags).
    Raises MLflow's own exception for a missing model, version or alias: the caller names the store."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if uri.startswith("runs:/"):
        return _with_run(client, uri.removeprefix("runs:/").split("/")[0], None, {}, uri)
    if not uri.startswith("models:/"):
        return VersionTags(run_id=None, version=None, uri=uri)
    name, _, ref = uri.removeprefix("models:/").partition("@")
    if ref:
        mv = client.get_model_version_by_alias(name, ref)
    else:
        name, _, version = name.partition("/")
        if not version:
            # MLflow 3's logged-model id (`models:/m-<id>`, what log_model returns): a run, no version
            run_id = client.get_logged_model(name).source_run_id if name.startswith("m-") else None
            return _with_run(client, run_id, None, {}, uri)
        mv = client.get_model_version(name, version)
    return _with_run(client, mv.run_id, str(mv.version), dict(mv.tags), f"models:/{name}/{mv.version}")


def of_run(run_id: str | None, name: str | None) -> VersionTags:
    """The tags of the registered version of `name` made from `run_id` (the newest, should a run have been
    registered more than once); the run's own tags when it has no version of that name."""
    from mlflow import MlflowClient

    if not run_id:
        return VersionTags(run_id=None, version=None)
    client = MlflowClient()
    found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'") if name else []
    if not found:
        return _with_run(client, run_id, None, {})
    chosen = max(found, key=lambda mv: int(mv.version))
    return _with_run(client, run_id, str(chosen.version), dict(chosen.tags))
