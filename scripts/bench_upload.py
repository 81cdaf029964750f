#!/usr/bin/env python3
"""The Batch API's upload memory: `POST /v1/files` of files from 64 MiB to 1 GiB (and more)
into `sluice serve --local`, sampling the server's resident memory (VmRSS) every 20 ms, and
printing one table row per size. The upload is streamed to the data directory chunk by chunk,
so the server's peak memory must not grow with the file.

    python3 scripts/bench_upload.py [--sluice target/release/sluice] [--sizes-mib 64,256,1024]

The files are valid OpenAI batch lines (about 250 bytes each) written to a temporary directory;
the client is curl, which streams the file from disk.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def write_input(path, mib):
    target = mib << 20
    line = '{{"custom_id":"req-{:010d}","method":"POST","url":"/v1/chat/completions","body":{{"model":"tiny","messages":[{{"role":"user","content":"Summarise the report on item {:010d} in one sentence, please."}}],"max_tokens":16}}}}\n'
    written, i = 0, 0
    with open(path, "w") as f:
        block = []
        while written < target:
            s = line.format(i, i)
            block.append(s)
            written += len(s)
            i += 1
            if len(block) == 4096:
                f.write("".join(block))
                block = []
        f.write("".join(block))
    return os.path.getsize(path), i


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sluice", default="target/debug/sluice")
    ap.add_argument("--sizes-mib", default="64,256,1024")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",")]

    with tempfile.TemporaryDirectory(prefix="sluice-upload-") as tmp:
        data = os.path.join(tmp, "data")
        port = free_port()
        log = open(os.path.join(tmp, "serve.log"), "w")
        server = subprocess.Popen(
            [args.sluice, "serve", "--local", "--listen", f"127.0.0.1:{port}", "--data-dir", data],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.time() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if server.poll() is not None or time.time() > deadline:
                        sys.exit(f"sluice serve did not start; see {log.name}")
                    time.sleep(0.1)
            idle = rss_kib(server.pid)
            rows = []
            for mib in sizes:
                path = os.path.join(tmp, f"in-{mib}.jsonl")
                size, lines = write_input(path, mib)
                before = rss_kib(server.pid)
                peak = [before]
                done = threading.Event()

                def sample():
                    while not done.is_set():
                        peak[0] = max(peak[0], rss_kib(server.pid))
                        time.sleep(0.02)

                t = threading.Thread(target=sample)
                t.start()
                start = time.time()
                out = subprocess.run(
                    ["curl", "-sS", "--fail-with-body", "-H", "Authorization: Bearer bench",
                     "-F", "purpose=batch", "-F", f"file=@{path}", f"http://127.0.0.1:{port}/v1/files"],
                    capture_output=True, text=True,
                )
                took = time.time() - start
                done.set()
                t.join()
                if out.returncode != 0:
                    sys.exit(f"upload of {mib} MiB failed: {out.stdout}{out.stderr}")
                obj = json.loads(out.stdout)
                if obj.get("bytes") != size:
                    sys.exit(f"the server stored {obj.get('bytes')} bytes of {size}")
                after = rss_kib(server.pid)
                rows.append((size, lines, took, before, peak[0], after))
                os.remove(path)
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(f"server idle RSS: {idle / 1024:.1f} MiB")
    print("| file | lines | upload s | MiB/s | RSS before (MiB) | RSS peak (MiB) | RSS after (MiB) | peak − before (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, lines, took, before, peak, after in rows:
        print(f"| {size / (1 << 20):,.0f} MiB | {lines:,} | {took:.1f} | {size / (1 << 20) / took:,.0f} | "
              f"{before / 1024:.1f} | {peak / 1024:.1f} | {after / 1024:.1f} | {(peak - before) / 1024:.1f} |")


if __name__ == "__main__":
    main()
