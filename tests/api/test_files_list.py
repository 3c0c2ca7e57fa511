"""`GET /v1/files` pages as OpenAI's does, walked by the official `openai` client's auto-pagination.

A real `vllm-batch serve` without a daemon (`serve_only`: nothing runs, no engine loads). Files are
uploaded through the client; one is written beside the server by another file store on the same data
folder, as the command line does when it registers a batch's results.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import openai
import pytest

from batch_pipeline.domain.tenancy import key_fingerprint
from batch_pipeline.entrypoints.api.files import FileStore
from tests.support.api_stack import API_KEY, OTHER_KEY, Stack

FILES = 23
PAGE = 5  # FILES is more than four pages of this


def _upload(client: openai.OpenAI, index: int) -> str:
    line = json.dumps({"custom_id": f"c{index}", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}})
    return client.files.create(file=(f"in-{index}.jsonl", (line + "\n").encode()), purpose="batch").id


@pytest.fixture(scope="module")
def served(serve_only: Callable[..., Stack]) -> Stack:
    return serve_only()


@pytest.fixture(scope="module")
def uploaded(served: Stack) -> list[str]:
    """FILES uploads of API_KEY (several per second: the order then rests on the ids), one of OTHER_KEY."""
    with openai.OpenAI(base_url=served.base_url, api_key=OTHER_KEY, max_retries=0) as other:
        _upload(other, -1)
    with openai.OpenAI(base_url=served.base_url, api_key=API_KEY, max_retries=0) as client:
        return [_upload(client, index) for index in range(FILES)]


@pytest.fixture
def client(served: Stack):
    with openai.OpenAI(base_url=served.base_url, api_key=API_KEY, max_retries=0, timeout=60) as openai_client:
        yield openai_client


def _pages(served: Stack, **params: str | int) -> list[dict]:
    """Every page of the list, raw, following `last_id` while `has_more`."""
    pages = []
    after = None
    while True:
        answer = httpx.get(f"{served.base_url}/files", params={**params, **({"after": after} if after else {})},
                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        answer.raise_for_status()
        pages.append(answer.json())
        if not pages[-1]["has_more"]:
            return pages
        after = pages[-1]["last_id"]


def test_auto_pagination_walks_every_file_once_newest_first(client: openai.OpenAI, served: Stack,
                                                            uploaded: list[str]):
    listed = list(client.files.list(limit=PAGE))  # the client follows `after` page by page

    ids = [file.id for file in listed]
    assert sorted(ids) == sorted(uploaded), "each of the key's files exactly once, no other key's"
    keys = [(file.created_at, file.id) for file in listed]
    assert keys == sorted(keys, reverse=True)
    pages = _pages(served, limit=PAGE)
    assert len(pages) == -(-FILES // PAGE)
    assert [len(page["data"]) for page in pages[:-1]] == [PAGE] * (len(pages) - 1)
    assert all(page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]
               for page in pages)
    assert [file["id"] for page in pages for file in page["data"]] == ids


def test_order_asc_purpose_and_the_default_page(client: openai.OpenAI, uploaded: list[str]):
    newest_first = [file.id for file in client.files.list()]
    assert sorted(newest_first) == sorted(uploaded)  # the default limit (10,000) holds them all on one page
    assert [file.id for file in client.files.list(limit=PAGE, order="asc")] == newest_first[::-1]
    assert [file.id for file in client.files.list(limit=PAGE, purpose="batch")] == newest_first
    assert list(client.files.list(purpose="batch_output")) == []
    with pytest.raises(openai.UnprocessableEntityError):
        client.files.list(order="sideways")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.list(after="file-" + "0" * 32)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "after"


def test_a_cursor_naming_a_deleted_file_still_finds_the_next_page(client: openai.OpenAI, uploaded: list[str]):
    cursor = client.files.list(limit=PAGE).data[-1].id
    client.files.delete(cursor)  # a client deleting the files it has read as it walks
    uploaded.remove(cursor)

    rest = [file.id for file in client.files.list(limit=PAGE, after=cursor)]
    assert rest == [file.id for file in client.files.list()][PAGE - 1:]  # from right after it; none skipped


def test_a_file_another_process_writes_is_listed(client: openai.OpenAI, served: Stack, uploaded: list[str]):
    before = [file.id for file in client.files.list()]  # the server's order has taken in the folder
    results = served.root / "elsewhere.jsonl"
    results.write_text("{}\n")
    # Another process's store on the same data folder (the command line registering a batch's results).
    written = FileStore(served.data_dir).register_result("batch_elsewhere", "output", results,
                                                         key_fingerprint(API_KEY))
    assert written is not None

    listed = [file.id for file in client.files.list(limit=PAGE)]
    assert sorted(listed) == sorted([*before, written])
    assert [file.id for file in client.files.list(purpose="batch_output")] == [written]


def test_a_record_another_process_rewrites_or_deletes_is_listed_as_it_is_now(client: openai.OpenAI, served: Stack,
                                                                             uploaded: list[str]):
    # The server trusts the records its last listing read until any process writes a new changes token:
    # a rewrite (a batch's results registered again, grown) and a delete by another process must show.
    results = served.root / "rewritten.jsonl"
    results.write_text("{}\n")
    other = FileStore(served.data_dir)  # the command line's store, on the same data folder
    owner = key_fingerprint(API_KEY)
    written = other.register_result("batch_rewritten", "output", results, owner)
    assert written is not None
    assert {file.id: file.bytes for file in client.files.list(limit=PAGE)}.get(written) == 3
    assert {file.id: file.bytes for file in client.files.list(limit=PAGE)}.get(written) == 3  # trusted now

    results.write_text("{}\n{}\n{}\n")
    assert other.register_result("batch_rewritten", "output", results, owner) == written
    assert {file.id: file.bytes for file in client.files.list(limit=PAGE)}.get(written) == 9
    other.delete(uploaded[0])
    assert uploaded[0] not in [file.id for file in client.files.list(limit=PAGE)]
