"""Storage options: S3 retry defaults reach every filesystem of a job, users' own settings win,
and refused access becomes one clear error naming the URL."""

from __future__ import annotations


import pytest

from kandinsky_engine.storage import (S3_RETRIES, StorageAccessError, access_checked, options_for, redact_url,
                                      url_to_fs)

KEY, SECRET = "AKIASTORAGECANARY77", "storage-canary-secret-0a1b2c3d"
OPTIONS = {"s3": {"endpoint_url": "http://127.0.0.1:9", "key": KEY, "secret": SECRET}}


@pytest.fixture(autouse=True)
def no_aws_retry_env(monkeypatch):
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)


def test_s3_filesystems_get_the_retry_policy_and_botocore_uses_it():
    fs, _ = url_to_fs("s3://bucket/manifests/", OPTIONS)
    assert fs.config_kwargs["retries"] == S3_RETRIES
    client_retries = fs.s3.meta.config.retries  # the real botocore client (made without a request)
    assert client_retries["mode"] == "standard" and client_retries["total_max_attempts"] == 10


def test_users_own_settings_win_and_are_not_mutated():
    mine = {"s3": {"key": KEY, "config_kwargs": {"read_timeout": 30, "retries": {"mode": "adaptive"}}}}
    merged = options_for("s3://b/k", mine)
    assert merged["config_kwargs"] == {"read_timeout": 30, "retries": {"mode": "adaptive", "total_max_attempts": 10}}
    assert mine["s3"]["config_kwargs"] == {"read_timeout": 30, "retries": {"mode": "adaptive"}}  # a copy

    counted = options_for("s3://b/k", {"s3": {"config_kwargs": {"retries": {"max_attempts": 2}}}})
    # botocore's max_attempts counts retries; adding total_max_attempts would silently override it.
    assert counted["config_kwargs"]["retries"] == {"max_attempts": 2, "mode": "standard"}


def test_aws_environment_settings_win(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    assert "config_kwargs" not in options_for("s3://b/k", OPTIONS)
    fs, _ = url_to_fs("s3://b/k", OPTIONS)
    assert fs.s3.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 4}


def test_other_protocols_are_untouched(tmp_path):
    assert options_for(str(tmp_path), OPTIONS) == {}
    assert options_for("memory://x", {"memory": {"a": 1}}) == {"a": 1}


def test_access_error_message_has_no_credentials():
    with pytest.raises(StorageAccessError) as err:
        with access_checked(f"s3://{KEY}:{SECRET}@bucket/key", OPTIONS):
            raise PermissionError(f"Access Denied for {KEY}")
    assert str(err.value).startswith("access denied reading s3://***@bucket/key: Access Denied for ***")
    assert KEY not in str(err.value) and SECRET not in str(err.value)
    assert redact_url("https://user:pw@host/p?q=1") == "https://***@host/p?q=1"


def test_the_fingerprint_names_a_manifest_location_the_same_however_it_is_written():
    """A trailing slash lists the same files; a presigned URL's query changes with every signing."""
    from kandinsky_engine.jobs.resume import manifest_location_id

    assert manifest_location_id("s3://b/manifests/") == manifest_location_id("s3://b/manifests") == "s3://b/manifests"
    signed = "https://h.example/m/m.parquet?X-Amz-Date={}&X-Amz-Signature={}"
    assert manifest_location_id(signed.format(1, "aa")) == manifest_location_id(signed.format(2, "bb")) == \
        "https://h.example/m/m.parquet"
    assert manifest_location_id("sftp://user:pw@host/m/") == "sftp://***@host/m"
