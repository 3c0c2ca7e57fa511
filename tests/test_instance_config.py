"""The instance `vllm-batch` writes: Dagster settings that shape what a new user sees first."""

from __future__ import annotations

from pathlib import Path

import yaml
from dagster import DagsterInstance

from batch_pipeline.domain.instance import instance_config
from batch_pipeline.domain.settings import Settings
from tests.support.files import REPO


def test_a_fresh_instance_opens_the_ui_without_dagsters_new_user_dialog(tmp_path: Path):
    # The webserver's `shouldShowNux` is `instance.nux_enabled and not seen`: with it off, the UI's first
    # page is not covered by the "Join the Dagster community" dialog (checked in Chromium by hand).
    home = tmp_path / "dagster"
    home.mkdir()
    config = instance_config(Settings(home=REPO, data_dir=tmp_path / "data", dagster_home=home))
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with DagsterInstance.from_config(str(home)) as instance:
        assert instance.nux_enabled is False
        assert instance.telemetry_enabled is False


def test_a_folder_without_instance_files_uses_the_projects_own(tmp_path: Path):
    # `vllm-batch run requests.jsonl ...` in any folder (the README's lean path): the folder's own dagster.yaml
    # wins when it has one, the project's otherwise.
    default = instance_config(Settings(home=tmp_path, data_dir=tmp_path / "data"))
    assert default["run_retries"]["enabled"] is True and default["nux"] == {"enabled": False}
    (tmp_path / "dagster.yaml").write_text("run_retries:\n  enabled: false\n")
    own = instance_config(Settings(home=tmp_path, data_dir=tmp_path / "data"))
    assert own["run_retries"] == {"enabled": False} and "nux" not in own
