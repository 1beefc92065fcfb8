"""redact: no credential survives into an error message, by value or by shape."""

from __future__ import annotations

import pytest

from multicloud.cloud import redact


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                  "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_KEY",
                                  "AZURE_STORAGE_SAS_TOKEN", "AZURE_CLIENT_SECRET",
                                  "AZURE_STORAGE_CONNECTION_STRING"])
def test_values_of_secret_variables_are_replaced(monkeypatch: pytest.MonkeyPatch,
                                                 name: str) -> None:
    secret = "Zq8-very-secret-value-91"
    monkeypatch.setenv(name, secret)
    text = redact(f"request failed: signed with {secret} (twice: {secret})")
    assert secret not in text
    assert text == "request failed: signed with *** (twice: ***)"


def test_short_values_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # A value of a few characters ("test", an emulator's) would blank out ordinary words.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    assert redact("the test failed") == "the test failed"


@pytest.mark.parametrize(("text", "secret"), [
    ("DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c2VjcmV0a2V5PT0=;"
     "EndpointSuffix=core.windows.net", "c2VjcmV0a2V5PT0="),
    ("BlobEndpoint=https://a.blob.core.windows.net/;SharedAccessSignature=sv=2022&sig=abc123",
     "sv=2022"),
    ("GET https://a.blob.core.windows.net/c/b?sv=2022-11-02&se=2026&sig=S1gnatur3%2B&sp=r",
     "S1gnatur3%2B"),
    ("GET https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAEXAMPLE%2F2026&"
     "X-Amz-Signature=deadbeef01&X-Amz-Security-Token=tok3n", "deadbeef01"),
    ("GET https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAEXAMPLE%2F2026&x=1", "AKIAEXAMPLE"),
    ("GET https://b.s3.amazonaws.com/k?X-Amz-Security-Token=tok3nvalue&x=1", "tok3nvalue"),
    ("headers: Authorization: Bearer ya29.a0AfH6SMB", "ya29.a0AfH6SMB"),
    ("authorization: AWS4-HMAC-SHA256 Credential=AKIA/2026", "Credential=AKIA"),
    ('{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\\nMIIE"}',
     "MIIE"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG", "wJalrXUtnFEMI"),
    ("secret_key: 'abcdEFGH1234'", "abcdEFGH1234"),
    ('"secretAccessKey": "zzTopSecret99"', "zzTopSecret99"),
])
def test_credentials_are_recognised_by_shape(text: str, secret: str) -> None:
    cleaned = redact(text)
    assert secret not in cleaned
    assert "***" in cleaned


def test_ordinary_messages_pass_unchanged() -> None:
    text = "s3://bucket/key: not found (no such bucket, container or object); sig=? no"
    assert redact("s3://bucket/key: not found") == "s3://bucket/key: not found"
    assert redact("") == ""
    assert "s3://bucket/key: not found" in redact(text)
