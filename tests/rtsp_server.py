"""A one-stream RTSP server on loopback for the live-ingest tests: ``python tests/rtsp_server.py PORT``.

FFmpeg cannot serve RTSP to a client that PLAYs (its rtsp muxer only pushes to a server,
and ``-rtsp_flags listen`` exists only on the demuxer, for receiving a push), so the RTSP
side is written here: OPTIONS, DESCRIBE, SETUP (interleaved TCP only), PLAY, GET_PARAMETER
and TEARDOWN. The media is real: imageio-ffmpeg's ffmpeg encodes a 25 fps ``testsrc`` to
H.264 and sends it as RTP over UDP to this process, with its SDP, and every RTP packet is
relayed to the clients that are playing. Prints ``ready`` once it accepts clients. Run it
in its own session and kill its process group: that takes ffmpeg down with it.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WIDTH, HEIGHT, FPS = 320, 240, 25


def start_encoder(rtp_port: int, sdp_file: Path) -> subprocess.Popen:
    import imageio_ffmpeg

    return subprocess.Popen(
        [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-re",
            "-f", "lavfi", "-i", f"testsrc=size={WIDTH}x{HEIGHT}:rate={FPS}",
            # a keyframe every 10 frames: a client that joins mid-stream decodes within 0.4 s
            "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "10", "-bf", "0", "-pix_fmt", "yuv420p",
            "-f", "rtp", "-sdp_file", str(sdp_file), f"rtp://127.0.0.1:{rtp_port}?pkt_size=1200",
        ],
        stdin=subprocess.DEVNULL,
    )


def session_description(sdp_file: Path) -> str:
    """ffmpeg's SDP with the control attributes RTSP needs and no UDP port of its own."""
    deadline = time.monotonic() + 20
    while not (sdp_file.is_file() and "m=video" in sdp_file.read_text()):
        if time.monotonic() > deadline:
            raise SystemExit("ffmpeg wrote no SDP")
        time.sleep(0.05)
    lines = []
    for line in sdp_file.read_text().splitlines():
        if not line.strip():
            continue
        if line.startswith("m=video"):
            lines += ["a=control:*", "m=video 0 RTP/AVP 96", "a=control:trackID=0"]
        else:
            lines.append(line)
    return "\r\n".join(lines) + "\r\n"


class Client:
    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.playing = False

    def send(self, data: bytes) -> None:
        with self.lock:
            self.conn.sendall(data)


def serve(port: int) -> None:
    clients: list[Client] = []
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind(("127.0.0.1", 0))
    work = Path(tempfile.mkdtemp(prefix="rtsp-"))
    encoder = start_encoder(rtp.getsockname()[1], work / "stream.sdp")
    try:
        sdp = session_description(work / "stream.sdp").encode()
        shutil.rmtree(work)  # now, while it can: the server ends killed
        threading.Thread(target=relay, args=(rtp, clients), daemon=True).start()
        listener = socket.create_server(("127.0.0.1", port))  # SO_REUSEADDR: a restart takes the same port at once
        print("ready", flush=True)
        while encoder.poll() is None:
            conn, _ = listener.accept()
            client = Client(conn)
            clients.append(client)
            threading.Thread(target=handle, args=(client, sdp, clients), daemon=True).start()
    finally:
        encoder.kill()


def relay(rtp: socket.socket, clients: list[Client]) -> None:
    while True:
        packet = rtp.recv(65536)
        frame = b"$\x00" + len(packet).to_bytes(2, "big") + packet  # interleaved channel 0
        for client in list(clients):
            if client.playing:
                try:
                    client.send(frame)
                except OSError:
                    client.playing = False


def handle(client: Client, sdp: bytes, clients: list[Client]) -> None:
    buffer = b""
    try:
        while True:
            chunk = client.conn.recv(65536)
            if not chunk:
                return
            buffer += chunk
            while buffer:
                if buffer[:1] == b"$":  # the client's RTCP, interleaved: read past it
                    end = 4 + int.from_bytes(buffer[2:4], "big")
                    if len(buffer) < max(end, 4):
                        break
                    buffer = buffer[end:]
                    continue
                head, sep, rest = buffer.partition(b"\r\n\r\n")
                if not sep:
                    break
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                length = int(headers.get("content-length", 0))
                if len(rest) < length:
                    break
                buffer = rest[length:]
                method, url = lines[0].split()[:2]
                answer(client, method, url, headers, sdp)
                if method == "TEARDOWN":
                    return
    except OSError:
        return
    finally:
        client.playing = False
        if client in clients:
            clients.remove(client)
        client.conn.close()


def answer(client: Client, method: str, url: str, headers: dict[str, str], sdp: bytes) -> None:
    reply = ["RTSP/1.0 200 OK", f"CSeq: {headers.get('cseq', '0')}"]
    body = b""
    if method == "OPTIONS":
        reply.append("Public: OPTIONS, DESCRIBE, SETUP, PLAY, GET_PARAMETER, TEARDOWN")
    elif method == "DESCRIBE":
        body = sdp
        reply += [f"Content-Base: {url.rstrip('/')}/", "Content-Type: application/sdp", f"Content-Length: {len(sdp)}"]
    elif method == "SETUP":
        if "interleaved" not in headers.get("transport", ""):
            client.send(f"RTSP/1.0 461 Unsupported Transport\r\nCSeq: {headers.get('cseq', '0')}\r\n\r\n".encode())
            return
        reply += ["Transport: RTP/AVP/TCP;unicast;interleaved=0-1", "Session: 1;timeout=60"]
    elif method in ("PLAY", "GET_PARAMETER", "TEARDOWN"):
        reply.append("Session: 1")
    else:
        reply[0] = "RTSP/1.0 501 Not Implemented"
    client.send(("\r\n".join(reply) + "\r\n\r\n").encode() + body)
    if method == "PLAY":
        client.playing = True


if __name__ == "__main__":
    serve(int(sys.argv[1]))
