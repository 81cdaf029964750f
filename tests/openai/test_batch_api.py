"""The official `openai` Python package as the client of `sluice serve --local`.

Run by cli/tests/serve_openai.rs against a server it starts with two tenants; by hand:
SLUICE_BASE_URL=http://127.0.0.1:8000/v1 SLUICE_KEY_A=... SLUICE_KEY_B=... python3 tests/openai/test_batch_api.py
Checks: upload, create, poll to completed, every custom_id once across output and error files
(input starts with a UTF-8 BOM), list pagination, cancel mid-run with nothing lost, tenant
isolation (404), a bad key (AuthenticationError), an unknown model (BadRequestError), and a
batch whose completion window ends first: expired, every custom_id once (batch_expired).
"""

import json
import os
import sys
import tempfile
import time

import openai
from openai import OpenAI

BASE = os.environ["SLUICE_BASE_URL"]
A = OpenAI(base_url=BASE, api_key=os.environ["SLUICE_KEY_A"], max_retries=0, timeout=60)
B = OpenAI(base_url=BASE, api_key=os.environ["SLUICE_KEY_B"], max_retries=0, timeout=60)
MODEL = os.environ.get("SLUICE_MODEL", "tiny-qwen2")


def lines(prefix, n, max_tokens, model=MODEL, temperature=0.0):
    out = []
    for i in range(n):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"hello number {i}"}],
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        out.append(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    return "\n".join(out) + "\n"


def upload(client, text, name):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        with open(path, "rb") as f:
            return client.files.create(file=f, purpose="batch")


def wait(client, batch_id, wanted, timeout):
    end = time.time() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in wanted:
            return b
        assert b.status not in ("failed", "expired", "cancelled", "completed"), f"batch {batch_id} ended {b.status}: {b.errors}"
        assert time.time() < end, f"batch {batch_id} still {b.status} after {timeout}s"
        time.sleep(0.5)


def records(client, batch):
    recs = []
    for fid in (batch.output_file_id, batch.error_file_id):
        if fid:
            recs += [json.loads(l) for l in client.files.content(fid).text.splitlines() if l.strip()]
    return recs


def check_each_once(client, batch, expected):
    ids = [r["custom_id"] for r in records(client, batch)]
    assert len(ids) == len(set(ids)), f"duplicate custom_ids in {batch.id}"
    assert sorted(ids) == sorted(expected), f"{batch.id}: {len(ids)} custom_ids, expected {len(expected)}"


def test_complete():
    # A UTF-8 byte-order mark at the start of the file is accepted (line 1 is a request).
    f = upload(A, "\ufeff" + lines("ok", 24, 8), "ok.jsonl")
    assert f.purpose == "batch" and f.bytes > 0 and f.object == "file"
    assert A.files.retrieve(f.id).id == f.id
    batch = A.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h", metadata={"suite": "openai"})
    assert batch.status in ("validating", "in_progress"), batch.status
    assert batch.metadata == {"suite": "openai"}
    assert batch.completion_window == "1h"
    done = wait(A, batch.id, ("completed",), 300)
    assert done.request_counts.total == 24, done.request_counts
    assert done.request_counts.completed == 24, done.request_counts
    assert done.completed_at and done.in_progress_at and done.finalizing_at and done.expires_at
    assert done.output_file_id
    recs = records(A, done)
    check_each_once(A, done, [f"ok-{i}" for i in range(24)])
    ok = [r for r in recs if r["error"] is None]
    assert all(r["response"]["status_code"] == 200 for r in ok)
    assert all(isinstance(r["response"]["body"]["choices"][0]["message"]["content"], str) for r in ok)
    ext = done.model_extra["sluice"]
    assert ext["sla_status"] == "Met", ext
    assert A.files.retrieve(done.output_file_id).purpose == "batch_output"
    return f, done


def test_pagination(first):
    ids = [first.id]
    for k in range(2):
        f = upload(A, lines(f"page{k}", 3, 4), f"page{k}.jsonl")
        ids.append(A.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="2d").id)
    page = A.batches.list(limit=1)
    assert len(page.data) == 1 and page.has_more, page
    assert page.data[0].id == ids[-1], "newest first"
    seen = [b.id for b in A.batches.list(limit=1)]  # the client follows `after` page by page
    assert len(seen) == len(set(seen)), seen
    assert set(ids) <= set(seen), (ids, seen)
    for bid in ids[1:]:
        wait(A, bid, ("completed",), 300)


def test_cancel():
    n = 3000
    f = upload(A, lines("slow", n, 400, temperature=1.0), "slow.jsonl")
    batch = A.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait(A, batch.id, ("in_progress",), 60)
    time.sleep(3)
    c = A.batches.cancel(batch.id)
    assert c.status in ("cancelling", "cancelled"), c.status
    done = wait(A, batch.id, ("cancelled",), 180)
    assert done.cancelling_at and done.cancelled_at
    check_each_once(A, done, [f"slow-{i}" for i in range(n)])
    cancelled = [r for r in records(A, done) if r["error"] and r["error"]["code"] == "batch_cancelled"]
    assert cancelled, "the cancel landed after every request had run: make the batch slower"
    assert done.request_counts.total == n
    assert done.request_counts.completed + done.request_counts.failed == n
    return f, done


def test_expiry():
    n = 1500
    f = upload(A, lines("late", n, 400, temperature=1.0), "late.jsonl")
    batch = A.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="15s")
    done = wait(A, batch.id, ("expired",), 240)
    assert done.expired_at and done.expires_at == done.created_at + 15, done
    check_each_once(A, done, [f"late-{i}" for i in range(n)])
    expired = [r for r in records(A, done) if r["error"] and r["error"]["code"] == "batch_expired"]
    assert expired, "every request ran inside 15 s: make the batch slower"
    assert done.request_counts.completed + done.request_counts.failed == n
    return f, done


def test_other_tenant_sees_nothing(files, batches):
    assert B.batches.list().data == []
    assert B.files.list().data == []
    for f in files:
        for call in (lambda: B.files.retrieve(f.id), lambda: B.files.content(f.id), lambda: B.files.delete(f.id)):
            try:
                call()
                raise AssertionError(f"tenant B reached {f.id}")
            except openai.NotFoundError:
                pass
    for b in batches:
        for call in (lambda: B.batches.retrieve(b.id), lambda: B.batches.cancel(b.id)):
            try:
                call()
                raise AssertionError(f"tenant B reached {b.id}")
            except openai.NotFoundError:
                pass


def test_bad_key_and_unknown_model():
    bad = OpenAI(base_url=BASE, api_key="sk-wrong", max_retries=0)
    try:
        bad.files.list()
        raise AssertionError("a bad key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401
    f = upload(A, lines("gpt", 2, 4, model="gpt-4o-mini"), "gpt.jsonl")
    try:
        A.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        raise AssertionError("an unknown model was accepted")
    except openai.BadRequestError as e:
        assert "gpt-4o-mini" in str(e), str(e)


def main():
    print(f"openai {openai.__version__} against {BASE}")
    f1, b1 = test_complete()
    print("completed batch: ok")
    test_pagination(b1)
    print("pagination: ok")
    f2, b2 = test_cancel()
    print(f"cancel: ok ({b2.request_counts.completed} completed, {b2.request_counts.failed} failed or cancelled)")
    f3, b3 = test_expiry()
    print(f"expiry: ok ({b3.request_counts.completed} completed, {b3.request_counts.failed} failed or expired)")
    test_other_tenant_sees_nothing([f1, f2, f3], [b1, b2, b3])
    print("tenant isolation: ok")
    test_bad_key_and_unknown_model()
    print("bad key, unknown model: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
