import json

import pytest
from pydantic import ValidationError

from orchestrator.errors import Unauthorized
from orchestrator.settings import SandboxSettings, Settings
from orchestrator.tenancy import Authenticator


def test_environment_configures_nested_settings(monkeypatch):
    monkeypatch.setenv("ORCH_PORT", "9000")
    monkeypatch.setenv("ORCH_SANDBOX__MEMORY_BYTES", str(512 << 20))
    monkeypatch.setenv("ORCH_API_KEYS", '{"sk-a": "team-a"}')
    settings = Settings()
    assert settings.port == 9000
    assert settings.sandbox.memory_bytes == 512 << 20
    assert settings.key_map() == {"sk-a": "team-a"}


def test_production_refuses_to_start_without_keys():
    with pytest.raises(ValidationError, match="production mode needs"):
        Settings(mode="production")
    with pytest.raises(ValidationError, match="no isolation"):
        Settings(mode="production", api_keys={"k": "t"}, backend="local")
    assert Settings(mode="production", api_keys={"k": "t"}).mode == "production"


def test_unsafe_values_are_refused():
    with pytest.raises(ValidationError):
        SandboxSettings(user="0:0")
    with pytest.raises(ValidationError):
        Settings(api_keys={"k": "bad tenant/name"})
    with pytest.raises(ValidationError):
        Settings(instance="a.b")


def test_keys_file_is_merged(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"sk-file": "team-f"}))
    settings = Settings(api_keys={"sk-a": "team-a"}, api_keys_file=path)
    assert settings.key_map() == {"sk-a": "team-a", "sk-file": "team-f"}


def test_production_accepts_only_configured_keys():
    auth = Authenticator(Settings(mode="production", api_keys={"sk-a": "team-a"}))
    assert auth.tenant_for("Bearer sk-a") == "team-a"
    for header in (None, "", "Bearer", "Bearer ", "Basic sk-a", "Bearer sk-other"):
        with pytest.raises(Unauthorized):
            auth.tenant_for(header)


def test_dev_mode_gives_every_key_its_own_tenant():
    auth = Authenticator(Settings(api_keys={"sk-a": "team-a"}))
    assert auth.tenant_for("Bearer sk-a") == "team-a"
    one, two = auth.tenant_for("Bearer anything"), auth.tenant_for("bearer other")
    assert one != two
    assert one == auth.tenant_for("Bearer anything")
    with pytest.raises(Unauthorized):
        auth.tenant_for(None)
