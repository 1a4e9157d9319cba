#!/usr/bin/env python3
"""A burst of forwarded queries to a dead upstream, and the server's memory.

Starts a silent upstream (a UDP socket that reads and never answers) and
`signpost server --dev` forwarding to it, sends 10,000 RD queries for
distinct names outside the zone in about 1.5 s, and prints the server's RSS
before, at its peak and 4 s after, with the answers' response codes.

    cargo build --release --bin signpost
    python3 integration/bench/forward-burst.py target/release/signpost [--max-forwards N]

Extra arguments go to `signpost server`.
"""
import socket
import struct
import subprocess
import sys
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    return 0


def query(i):
    labels = [f"n{i}".encode(), b"example", b"com"]
    name = b"".join(bytes([len(l)]) + l for l in labels) + b"\0"
    # RD set, one question, A IN.
    return struct.pack(">HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1)


def main():
    binary, extra = sys.argv[1], sys.argv[2:]
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    upstream.setblocking(False)
    dns = free_port()
    server = subprocess.Popen(
        [binary, "server", "--dev", "--api", f"127.0.0.1:{free_port()}",
         "--dns", f"127.0.0.1:{dns}", "--udp-sockets", "1",
         "--upstream", f"127.0.0.1:{upstream.getsockname()[1]}", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        client.setblocking(False)
        before = rss_mb(server.pid)
        peak, codes = before, {}

        def drain():
            for sock in (client, upstream):
                try:
                    while True:
                        data = sock.recv(4096)
                        if sock is client:
                            codes[data[3] & 15] = codes.get(data[3] & 15, 0) + 1
                except BlockingIOError:
                    pass

        started = time.time()
        for i in range(10_000):
            client.sendto(query(i), ("127.0.0.1", dns))
            if i % 500 == 0:
                peak = max(peak, rss_mb(server.pid))
                time.sleep(0.07)
            drain()
        sent = time.time() - started
        end = time.time() + 4
        while time.time() < end:
            peak = max(peak, rss_mb(server.pid))
            drain()
            time.sleep(0.05)
        names = {0: "NOERROR", 2: "SERVFAIL", 5: "REFUSED"}
        print(f"10,000 queries in {sent:.2f} s; RSS before {before} MB, peak {peak} MB, "
              f"4 s after {rss_mb(server.pid)} MB; answers "
              + ", ".join(f"{names.get(k, k)} {v}" for k, v in sorted(codes.items())))
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
