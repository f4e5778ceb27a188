"""Every file the project downloads comes over HTTPS and is checked against a digest (issue 12)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import common.data.datasets as datasets_module

ROOT = Path(__file__).resolve().parent.parent
DOWNLOADS = [(name, d) for name, table in datasets_module._DOWNLOADS.items() for d in table]


def test_the_download_table_is_not_empty():
    assert {"fashion-mnist", "cifar10"} <= set(datasets_module._DOWNLOADS)


@pytest.mark.parametrize(("name", "download"), DOWNLOADS, ids=[d.url.rsplit("/", 1)[-1] for _, d in DOWNLOADS])
def test_download_is_https_with_checksums(name, download):
    assert download.url.startswith("https://"), f"{name}: {download.url} is not HTTPS"
    assert re.fullmatch(r"[0-9a-f]{64}", download.sha256), f"{name}: {download.url} has no SHA-256"
    assert re.fullmatch(r"[0-9a-f]{32}", download.md5), f"{name}: {download.url} has no MD5"


def test_digests_are_distinct():
    # a digest copied to the wrong file would make that download fail for everyone
    for field in ("md5", "sha256"):
        values = [getattr(d, field) for _, d in DOWNLOADS]
        assert len(values) == len(set(values)), field


@pytest.mark.parametrize("path", sorted((ROOT / "common" / "data").glob("*.py")), ids=lambda p: p.name)
def test_data_modules_name_no_plain_http_url(path):
    # help texts included: a user told to fetch a file should be told an HTTPS address
    assert not re.findall(r"http://[^\s\"']+", path.read_text())
