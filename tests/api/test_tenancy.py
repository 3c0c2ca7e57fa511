"""The Batch API's security through the official `openai` client against real servers: tenants (one per
key, admin keys see all), keys kept out of logs and files, model folders only by opt-in, and uploads
refused while they stream.

Most tests use servers without a daemon (`serve_only`): batches queue and never run, so no engine loads.
One test runs a batch on the live stack to show that its result files belong to its key.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.api_stack import ADMIN_KEY, API_KEY, MAX_UPLOAD_BYTES, OTHER_KEY, Stack
from tests.support.request_lines import MODEL_NAME

KEYS = (API_KEY, OTHER_KEY, ADMIN_KEY)
MAX_LINE_BYTES = 16384
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def chat_line(custom_id: str, model: str = MODEL_NAME, max_tokens: int = 2) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens,
            "temperature": 0}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def client_for(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=60)


def upload(client: openai.OpenAI, *lines: str, name: str = "requests.jsonl") -> str:
    return client.files.create(file=(name, ("\n".join(lines) + "\n").encode()), purpose="batch").id


def create_batch(client: openai.OpenAI, file_id: str) -> str:
    return client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id


def not_found(call: Callable[..., object], *args: str) -> dict:
    """The error body of `call(*args)`, which must answer 404."""
    with pytest.raises(openai.NotFoundError) as caught:
        call(*args)
    assert isinstance(caught.value.body, dict)
    return caught.value.body


def leaked_keys(stack: Stack) -> list[str]:
    """Every file under the stack's folder (logs, data folder, DAGSTER_HOME and its databases) holding a key."""
    found = []
    for path in stack.root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            found += [f"{path}: {key}" for key in KEYS if key.encode() in content]
    return found


@pytest.fixture(scope="module")
def served(serve_only: Callable[..., Stack]) -> Stack:
    """A server without a daemon, with the curation routes on (to check an integration's routes too)."""
    return serve_only(VBATCH_ENABLE_CURATION="true", VBATCH_MAX_LINE_BYTES=str(MAX_LINE_BYTES))


# ---- tenants -------------------------------------------------------------------------------------------


def test_a_key_sees_only_its_own_files_and_batches_and_an_admin_key_sees_all(served: Stack):
    from batch_pipeline.domain.batches import Submission
    from batch_pipeline.domain.tenancy import key_fingerprint

    one, other, admin = (client_for(served, key) for key in KEYS)
    own_file, other_file = upload(one, chat_line("a")), upload(other, chat_line("b"))
    own_batch, other_batch = create_batch(one, own_file), create_batch(other, other_file)

    for client, (mine, my_batch), (theirs, their_batch) in ((one, (own_file, own_batch), (other_file, other_batch)),
                                                           (other, (other_file, other_batch), (own_file, own_batch))):
        assert mine in {f.id for f in client.files.list()} and theirs not in {f.id for f in client.files.list()}
        listed = {b.id for b in client.batches.list(limit=100)}
        assert my_batch in listed and their_batch not in listed
        assert client.files.retrieve(mine).id == mine and client.batches.retrieve(my_batch).id == my_batch

        # Another tenant's ids answer exactly as ids that do not exist.
        for call in (client.files.retrieve, client.files.content, client.files.delete):
            error = not_found(call, theirs)
            assert error["code"] == "not_found" and error["message"] == f"No such File object: {theirs}"
        for call in (client.batches.retrieve, client.batches.cancel):
            error = not_found(call, their_batch)
            assert error["code"] == "not_found" and error["message"] == f"No batch found with id '{their_batch}'."
        with pytest.raises(openai.BadRequestError) as caught:
            create_batch(client, theirs)
        assert caught.value.body["code"] == "file_not_found" and caught.value.body["param"] == "input_file_id"
        with pytest.raises(openai.BadRequestError) as caught:
            client.batches.list(after=their_batch)
        assert caught.value.body["code"] == "batch_not_found"

        # An integration's route checks the tenant too: the batch is unknown, not merely without curation.
        key = client.api_key
        theirs_curation = httpx.get(f"{served.base_url}/batches/{their_batch}/curation",
                                    headers={"Authorization": f"Bearer {key}"})
        assert theirs_curation.status_code == 404 and theirs_curation.json()["error"]["code"] == "not_found"
        mine_curation = httpx.get(f"{served.base_url}/batches/{my_batch}/curation",
                                  headers={"Authorization": f"Bearer {key}"})
        assert mine_curation.status_code == 404 and mine_curation.json()["error"]["code"] == "curation_not_found"

    # A batch queued from the command line belongs to no tenant: only an admin key sees it (and its input file).
    (served.root / "cli.jsonl").write_text(chat_line("cli-0") + "\n")
    cli = served.cli("submit", str(served.root / "cli.jsonl"), "--model", MODEL_NAME, "--batch-id", "from-the-cli")
    assert cli.returncode == 0, cli.stderr
    for client in (one, other):
        not_found(client.batches.retrieve, "from-the-cli")
        assert "from-the-cli" not in {b.id for b in client.batches.list(limit=100)}

    # The admin key sees every tenant, and acts on them.
    assert {own_file, other_file} <= {f.id for f in admin.files.list()}
    assert {own_batch, other_batch, "from-the-cli"} <= {b.id for b in admin.batches.list(limit=100)}
    cli_input = admin.batches.retrieve("from-the-cli").input_file_id
    assert admin.files.content(cli_input).content == (served.root / "cli.jsonl").read_bytes()
    for client in (one, other):
        not_found(client.files.retrieve, cli_input)
    for batch_id in (own_batch, other_batch):
        assert httpx.get(f"{served.base_url}/batches/{batch_id}/curation",
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["error"]["code"] == "curation_not_found"
    assert admin.batches.cancel(other_batch).status == "cancelled"
    assert one.batches.cancel(own_batch).status == "cancelled"

    # The owner is stored as the key's fingerprint (never the key), on the file and the batch.
    data = served.data_dir
    assert json.loads((data / "files" / own_file / "file.json").read_text())["owner"] == key_fingerprint(API_KEY)
    submission = Submission.model_validate_json((data / "batches" / other_batch / "submission.json").read_text())
    assert submission.owner == key_fingerprint(OTHER_KEY)
    assert not leaked_keys(served)


def test_the_owner_stamp_goes_on_the_queue_ticket(serve_only: Callable[..., Stack]):
    from batch_pipeline.domain.constants import OWNER_TAG, SOURCE_TAG
    from batch_pipeline.domain.tenancy import key_fingerprint

    stack = serve_only()
    batch_id = create_batch(client_for(stack, OTHER_KEY), upload(client_for(stack, OTHER_KEY), chat_line("t")))
    [ticket] = [json.loads(p.read_text()) for p in (stack.data_dir / "queue").glob("*.json")]
    assert ticket["batch_id"] == batch_id
    assert ticket["tags"] == {SOURCE_TAG: "api", OWNER_TAG: key_fingerprint(OTHER_KEY)}


def test_no_key_reaches_the_log_or_any_file(served: Stack):
    # Requests with every key, good and bad, then the whole log and every file of the stack are searched.
    for key in KEYS:
        client = client_for(served, key)
        client.batches.list()
        not_found(client.batches.retrieve, "batch_unknown")
        with pytest.raises(openai.BadRequestError):
            client.files.create(file=("bad.jsonl", b"\x00\x01"), purpose="batch")
    for wrong in ("Bearer " + API_KEY[:-1], "Basic " + API_KEY, API_KEY):
        assert httpx.get(served.base_url + "/batches", headers={"Authorization": wrong}).status_code == 401
    log = served.full_log("server")
    assert log.startswith("serving the Batch API")  # the whole log, from its first line
    assert not [key for key in KEYS if key in log]
    assert not leaked_keys(served)


def test_every_key_is_compared_with_compare_digest_even_after_a_match(monkeypatch: pytest.MonkeyPatch):
    # What this checks is the code's part of a constant-time check: hmac.compare_digest on digests of one
    # length, every key every time. The timing itself is hmac.compare_digest's promise, not measured here.
    import asyncio
    import hashlib
    import hmac

    from batch_pipeline.entrypoints.api import app as api_app

    compared: list[bytes] = []
    compare_digest = hmac.compare_digest

    def counting_compare(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return compare_digest(a, b)

    monkeypatch.setattr(api_app.hmac, "compare_digest", counting_compare)
    seen: list[object] = []

    async def inner(scope, receive, send) -> None:
        seen.append(scope["state"]["tenant"])

    auth = api_app.BearerAuth(inner, keys=frozenset({"k-one", "k-two"}), admin_keys=frozenset({"k-admin"}))
    scope = {"type": "http", "path": "/v1/batches", "headers": [(b"authorization", b"Bearer k-one")]}
    asyncio.run(auth(scope, None, None))  # type: ignore[arg-type]
    # Every key is compared (as a digest of one length), even after the match, so the time taken does not
    # say which key matched.
    assert sorted(compared) == sorted(hashlib.sha256(key).digest() for key in (b"k-admin", b"k-one", b"k-two"))
    assert seen == [api_app.Tenant(api_app.key_fingerprint("k-one"))]


def test_a_finished_batch_s_files_belong_to_its_key(stack: Stack, client: openai.OpenAI):
    # The live stack (daemon, engine): the batch runs, its output and error files are its key's only.
    other, admin = client_for(stack, OTHER_KEY), client_for(stack, ADMIN_KEY)
    batch_id = create_batch(client, upload(client, chat_line("f-0"), "{not json"))
    deadline = time.time() + 300
    while (batch := client.batches.retrieve(batch_id)).status not in TERMINAL and time.time() < deadline:
        time.sleep(1)
    assert batch.status == "completed", (batch, stack.log("daemon"))
    assert batch.output_file_id and batch.error_file_id
    for file_id in (batch.output_file_id, batch.error_file_id, batch.input_file_id):
        assert client.files.content(file_id).content == admin.files.content(file_id).content
        not_found(other.files.content, file_id)
        not_found(other.files.retrieve, file_id)
        assert file_id not in {f.id for f in other.files.list()}
    not_found(other.batches.retrieve, batch_id)

    from dagster import DagsterInstance, RunsFilter

    from batch_pipeline.domain.constants import OWNER_TAG
    from batch_pipeline.domain.tenancy import key_fingerprint

    with DagsterInstance.from_config(stack.env["DAGSTER_HOME"]) as instance:
        [run] = instance.get_run_records(RunsFilter(tags={"vllm_batch/batch_id": batch_id}))
    assert run.dagster_run.tags[OWNER_TAG] == key_fingerprint(API_KEY)
    # Every log of the stack (server, daemon, the runs' compute logs) and every file of it, searched whole.
    assert not [key for key in KEYS if key in stack.full_log("server") + stack.full_log("daemon")]
    assert not leaked_keys(stack)


# ---- model folders -------------------------------------------------------------------------------------


def test_an_api_batch_naming_a_model_folder_is_refused_by_default(served: Stack, tiny_model: Path):
    client = client_for(served, API_KEY)
    for name in (str(tiny_model), "models/tiny-llama", "/etc", "/no/such/folder"):
        file_id = upload(client, chat_line("m", model=name))
        with pytest.raises(openai.BadRequestError) as caught:
            create_batch(client, file_id)
        error = caught.value.body
        assert error["code"] == "model_not_found" and error["param"] == "input_file_id"
        # One answer whatever lies on the disk: a model folder, another folder, nothing.
        assert error["message"] == (f"unknown model {name!r} (served models: {MODEL_NAME}); only served model "
                                    "names are accepted here, not model folders")
    assert not [b for b in client.batches.list() if b.model != MODEL_NAME]


def test_an_api_batch_may_name_a_model_folder_with_the_opt_in(serve_only: Callable[..., Stack], tiny_model: Path):
    opted_in = serve_only(VBATCH_API_ALLOW_LOCAL_MODEL_PATHS="true")
    client = client_for(opted_in, API_KEY)
    batch = client.batches.retrieve(create_batch(client, upload(client, chat_line("m", model=str(tiny_model)))))
    assert batch.status == "validating" and batch.model == str(tiny_model)
    with pytest.raises(openai.BadRequestError) as caught:  # a folder without a model config is still refused
        create_batch(client, upload(client, chat_line("m", model="/etc")))
    assert caught.value.body["code"] == "model_not_found"


def test_the_command_line_still_takes_a_model_folder(offline: Stack, tiny_model: Path):
    path = offline.root / "local.jsonl"
    path.write_text(chat_line("c", model=str(tiny_model)) + "\n")
    result = offline.cli("submit", str(path), "--model", str(tiny_model), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "validating"


# ---- uploads -------------------------------------------------------------------------------------------


class EndlessFile(io.RawIOBase):
    """A file of `total` bytes made up as it is read (`head`, then `filler` repeated): never in memory or on disk.

    Not seekable, so the client cannot know its length and sends it chunked: the server learns the size
    only by reading it.
    """

    def __init__(self, head: bytes, filler: bytes, total: int):
        self.head, self.filler, self.total, self.given = head, filler, total, 0
        self.name = "endless.jsonl"

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        size = min(len(buffer), self.total - self.given)
        start = self.given
        if start < len(self.head):
            data = (self.head[start:] + self.filler * (size // len(self.filler) + 1))[:size]
        else:
            offset = (start - len(self.head)) % len(self.filler)
            data = (self.filler * (size // len(self.filler) + 2))[offset:offset + size]
        buffer[:size] = data
        self.given += size
        return size


TEN_GB = 10 * 1024**3


@pytest.mark.parametrize("head, filler, status, code", [
    pytest.param(b"", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 64, 400, "invalid_file", id="binary"),
    pytest.param(b"", b"\xff\xfe garbage that is not UTF-8 " * 64, 400, "invalid_file", id="not-utf8"),
    pytest.param(b"", b"plain text, not one JSON object per line\n", 400, "invalid_file", id="text"),
    pytest.param((chat_line("ok") + "\n").encode(), b"a" * 4096, 400, "line_too_long", id="endless-line"),
    pytest.param(b"", (chat_line("ok") + "\n").encode(), 413, "file_too_large", id="valid-but-too-big"),
])
def test_a_10_gb_upload_is_refused_while_it_streams_and_leaves_nothing(served: Stack, head: bytes, filler: bytes,
                                                                       status: int, code: str):
    client = client_for(served, API_KEY)
    files = served.data_dir / "files"
    files.mkdir(parents=True, exist_ok=True)  # when this test runs first, as it may alone
    before = {entry.name for entry in files.iterdir()} - {".uploads"}
    listed = [file.id for file in client.files.list()]
    source = EndlessFile(head, filler, TEN_GB)
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=source, purpose="batch")
    assert caught.value.status_code == status and caught.value.body["code"] == code
    assert caught.value.body["param"] == "file" and caught.value.body["message"]
    # The server stopped reading at the fault and closed the connection: the client sent a few socket
    # buffers past the limit, not the 10 GB.
    assert source.given < MAX_UPLOAD_BYTES + 32 * 1024 * 1024
    assert {entry.name for entry in files.iterdir()} - {".uploads"} == before
    assert not any((files / ".uploads").iterdir())
    assert [file.id for file in client.files.list()] == listed  # the server still answers, and lists nothing new


def test_a_first_line_that_is_not_a_request_object_is_refused_but_later_bad_lines_are_kept(served: Stack):
    client = client_for(served, API_KEY)
    for first in ("[1, 2]", "{not json", '"a string"'):
        with pytest.raises(openai.BadRequestError) as caught:
            upload(client, first, chat_line("x"))
        assert caught.value.body["code"] == "invalid_file" and "line 1 " in caught.value.body["message"]
    # Blank lines before the first request are fine; a bad line further down becomes an error record later.
    file_id = upload(client, "", chat_line("x"), "{not json", "x" * (MAX_LINE_BYTES - 1))
    assert client.files.retrieve(file_id).bytes > MAX_LINE_BYTES
    with pytest.raises(openai.BadRequestError) as caught:
        upload(client, chat_line("x"), "y" * (MAX_LINE_BYTES + 1))
    assert caught.value.body["code"] == "line_too_long" and "line 2 " in caught.value.body["message"]
