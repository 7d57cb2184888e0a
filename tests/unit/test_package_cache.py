"""The package cache's configuration: upstream credentials and CA, handed to proxpi only."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from orchestrator.package_cache import merged_ca_bundle, proxpi_environment, upstream_url
from orchestrator.settings import PackageCacheSettings, Settings


def test_credentials_go_into_the_upstream_url(tmp_path: Path) -> None:
    plain = PackageCacheSettings(upstream_url="https://index.example/simple/")
    assert upstream_url(plain) == "https://index.example/simple/"
    with_password = PackageCacheSettings(
        upstream_url="https://old:creds@index.example/simple/",
        upstream_username="ci bot",
        upstream_password=SecretStr("p@ss:word"),
    )
    assert upstream_url(with_password) == "https://ci%20bot:p%40ss%3Aword@index.example/simple/"
    secret = tmp_path / "password"
    secret.write_text("from-file\n")
    from_file = PackageCacheSettings(
        upstream_url="https://index.example/simple/",
        upstream_username="u",
        upstream_password=SecretStr("ignored"),
        upstream_password_file=secret,
    )
    assert upstream_url(from_file) == "https://u:from-file@index.example/simple/"


def test_proxpi_is_configured_from_the_settings(tmp_path: Path) -> None:
    settings = PackageCacheSettings(cache_dir=tmp_path, cache_bytes=64 * 1024 * 1024, index_ttl_seconds=60)
    env = proxpi_environment(settings, ca_bundle=None)
    assert env["PROXPI_CACHE_DIR"] == str(tmp_path)
    assert env["PROXPI_CACHE_SIZE"] == str(64 * 1024 * 1024)
    assert env["PROXPI_INDEX_TTL"] == "60"
    assert float(env["PROXPI_DOWNLOAD_TIMEOUT"]) == settings.download_timeout_seconds
    assert "REQUESTS_CA_BUNDLE" not in env
    bundle = tmp_path / "ca.pem"
    assert proxpi_environment(settings, bundle)["REQUESTS_CA_BUNDLE"] == str(bundle)


def test_the_extra_ca_is_added_to_the_public_ones(tmp_path: Path) -> None:
    extra = tmp_path / "corp.pem"
    extra.write_text("-----BEGIN CERTIFICATE-----\ncorp\n-----END CERTIFICATE-----\n")
    merged = merged_ca_bundle(extra, tmp_path).read_text()
    assert merged.endswith(extra.read_text())
    assert merged.count("BEGIN CERTIFICATE") > 100  # certifi's roots are still there


def test_settings_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("ORCH_PACKAGE_CACHE__UPSTREAM_URL", "https://mirror.example/simple/")
    monkeypatch.setenv("ORCH_PACKAGES__ENABLED", "false")
    monkeypatch.setenv("ORCH_PACKAGES__MAX_DOWNLOAD_BYTES", str(2 * 1024 * 1024))
    settings = Settings()
    assert settings.package_cache.upstream_url == "https://mirror.example/simple/"
    assert settings.packages.enabled is False
    assert settings.packages.max_download_bytes == 2 * 1024 * 1024
