"""A bounded soak: frames at a fixed rate for M minutes through a real broker and worker processes.

    .venv/bin/python -m bench.soak --minutes 5 --rate 100 [--model interneg-tiny|ViT-B-32] [--workers 2] [--out DIR]

Starts a local Kafka broker (deploy/kafka), fresh topics, a bundle prepared from
deploy/samples/classes (as bench/run.py does), N scoring workers and one inversion worker
as processes. Produces real sample photographs (640x480 JPEG, bench/stream_bench.py) at a
paced, fixed rate, round-robin over the frames topic's partitions, and every --sample-s
seconds records: the scoring group's lag on the frames topic (end offsets minus committed
offsets, from the broker), the inversion group's lag on the candidates topic, each
process's RSS (/proc), frames produced and scored (distinct frame ids read back from the
scores topic, which is keyed by frame id), the latency from send to score readable, and
dead letters. Then drains (until the lag is 0 and every frame is scored, or --drain-s),
writes DIR/soak.json and DIR/soak.png, prints a summary, and stops everything it started,
also on Ctrl-C, SIGTERM or an error. Exits 1 if a frame was lost (never scored), else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from kafka import TopicPartition

from bench.stream_bench import CommitWatcher, Deployment, frame_headers, rss_kib, sample_frames
from schemas.settings import ModelSettings, Settings
from workers.kafka_clients import make_consumer, make_producer

PNG_SIZE = (1000, 900)  # pixels: figsize (10, 9) at 100 dpi


class ScoreReader(threading.Thread):
    """Reads the scores topic from the beginning: distinct frame ids, duplicates, send-to-score latency."""

    def __init__(self, settings: Settings, sent_at: dict[str, float]):
        super().__init__(name="score-reader", daemon=True)
        self.sent_at = sent_at
        self.consumer = make_consumer(settings.kafka, group_id=None, isolation_level="read_committed")
        topic = settings.topics.scores
        partitions = [TopicPartition(topic, p) for p in self.consumer.partitions_for_topic(topic)]
        self.consumer.assign(partitions)
        self.consumer.seek_to_beginning(*partitions)
        self.lock = threading.Lock()
        self.scored: set[str] = set()
        self.records = 0
        self.latencies: list[float] = []  # seconds, in arrival order, first score of each frame
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                for records in self.consumer.poll(timeout_ms=200).values():
                    arrived = time.monotonic()
                    with self.lock:
                        for r in records:
                            frame_id = r.key.decode()
                            self.records += 1
                            if frame_id not in self.scored:
                                self.scored.add(frame_id)
                                if frame_id in self.sent_at:
                                    self.latencies.append(arrived - self.sent_at[frame_id])
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.consumer.close()

    def snapshot(self) -> tuple[int, int, int]:
        """(distinct frames scored, score records, latencies so far)."""
        with self.lock:
            return len(self.scored), self.records, len(self.latencies)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


def _end_total(consumer, topic: str) -> int:
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    return sum(consumer.end_offsets(partitions).values()) if partitions else 0


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class Soak:
    def __init__(self, deployment: Deployment, settings: Settings, args):
        self.d, self.s, self.args = deployment, settings, args
        self.sent_at: dict[str, float] = {}
        self.samples: list[dict] = []
        self.processes: dict[str, object] = {}  # label -> WorkerProcess
        self.start = 0.0
        self.attempted = 0
        self.failed: list[str] = []

    # --- one sample -------------------------------------------------------------------------
    def sample(self, phase: str) -> dict:
        now = time.monotonic()
        lag, end = self.frames_watch.lag()
        inversion_lag, _ = self.candidates_watch.lag()
        scored, records, n_lat = self.reader.snapshot()
        rss = {label: rss_kib(w.process.pid) for label, w in self.processes.items() if w.process.poll() is None}
        broker_pid = self._broker_pid()
        if broker_pid:
            rss["broker"] = rss_kib(broker_pid)
        prev = self.samples[-1] if self.samples else {"t": 0.0, "scored": 0, "sent": 0, "latencies_n": 0}
        t = now - self.start
        dt = t - prev["t"]
        short = dt < 0.2 * self.args.sample_s  # too short an interval for a rate (the first and last samples)
        latencies = self.reader.latencies[prev["latencies_n"]:n_lat]
        sample = {
            "t": round(t, 3),
            "phase": phase,
            "sent": self.attempted,
            "frames_end_offset": end,
            "scored": scored,
            "score_records": records,
            "lag": lag,
            "inversion_lag": inversion_lag,
            "produced_fps": None if short else (self.attempted - prev["sent"]) / dt,
            "scored_fps": None if short else (scored - prev["scored"]) / dt,
            "latency_p50_s": _pct(latencies, 50),
            "latency_p99_s": _pct(latencies, 99),
            "latencies_n": n_lat,
            "rss_kib": rss,
            "exited": sorted(label for label, w in self.processes.items() if w.process.poll() is not None),
            "deadletters": _end_total(self.frames_watch.consumer, self.s.topics.deadletter),
            "load_1m": round(os.getloadavg()[0], 2),
            "sampling_s": round(time.monotonic() - now, 3),  # what taking this sample cost the paced loop
        }
        self.samples.append(sample)
        if self.args.verbose:
            print(f"  t={t:6.1f}s {phase:5s} sent {self.attempted:7d} scored {scored:7d} lag {lag:6d} "
                  f"scored/s {sample['scored_fps'] or 0:6.1f} rss " + " ".join(f"{k}={v // 1024}M" for k, v in rss.items()), flush=True)
        if self.reader.error is not None:
            raise RuntimeError(f"reading the scores topic failed: {self.reader.error!r}")
        return sample

    def _broker_pid(self) -> int | None:
        if self.d.broker is None:
            return None
        try:
            pid = int((self.d.broker.home / "broker.pid").read_text().strip())
            return pid if Path(f"/proc/{pid}").exists() else None
        except (OSError, ValueError):
            return None

    # --- the run ----------------------------------------------------------------------------
    def run(self) -> dict:
        a, s = self.args, self.s
        for k in range(a.workers):
            self.processes[f"score-{k}"] = self.d.start("score-worker", s, f"soak-score-{k}", wait=False)
        self.processes["invert"] = self.d.start("invert-worker", s, "soak-invert", wait=False)
        started = time.monotonic()
        for w in self.processes.values():
            w.wait_ready(timeout_s=600)
        print(f"{len(self.processes)} workers ready in {time.monotonic() - started:.1f} s; "
              f"{a.rate:g} frames/s for {a.minutes:g} min", flush=True)
        time.sleep(a.settle_s)  # let the scoring group finish its join rebalances
        self.frames_watch = CommitWatcher(s)
        self.candidates_watch = CommitWatcher(s, topic=s.topics.candidates, group=s.kafka.inversion_group)
        self.reader = ScoreReader(s, self.sent_at)
        self.reader.start()
        producer = make_producer(s.kafka)
        partitions = sorted(producer.partitions_for(s.topics.frames))
        data = sample_frames(10)
        total = round(a.minutes * 60 * a.rate)
        try:
            self.start = time.monotonic()
            next_sample = self.start + a.sample_s
            self.sample("run")
            while self.attempted < total:
                now = time.monotonic()
                due = min(total, int((now - self.start) * a.rate) + 1)
                while self.attempted < due:  # frame i is due at start + i / rate
                    i = self.attempted
                    frame_id = f"soak-{i}"
                    p = partitions[i % len(partitions)]
                    camera = f"soak-cam-{p}"
                    self.sent_at[frame_id] = time.monotonic()
                    future = producer.send(s.topics.frames, key=camera.encode(), value=data[i % len(data)],
                                           headers=frame_headers(frame_id, camera), partition=p)
                    future.add_errback(lambda exc, f=frame_id: self.failed.append(f"{f}: {exc!r}"))
                    self.attempted += 1
                if time.monotonic() >= next_sample:
                    self.sample("run")
                    next_sample += a.sample_s
                wake = min(self.start + self.attempted / a.rate, next_sample)
                time.sleep(max(0.0, wake - time.monotonic()))
            producer.flush()
            produce_s = time.monotonic() - self.start
            self.sample("run")
            # drain: until nothing is behind and every frame is read back, or the bound
            drain_start = time.monotonic()
            next_sample = drain_start + a.sample_s
            while time.monotonic() - drain_start < a.drain_s:
                if self.frames_watch.lag()[0] == 0 and self.reader.snapshot()[0] >= self.attempted - len(self.failed):
                    break
                if time.monotonic() >= next_sample:
                    self.sample("drain")
                    next_sample += a.sample_s
                time.sleep(0.25)
            drain_s = time.monotonic() - drain_start
            self.sample("drain")
            statuses = {}
            for label, w in self.processes.items():
                try:
                    statuses[label] = w.status() if w.process.poll() is None else {}
                except OSError:
                    statuses[label] = {}
        finally:
            producer.close(timeout=10)
            self.reader.stop()
            self.frames_watch.close()
            self.candidates_watch.close()
        return self.summary(produce_s, drain_s, statuses)

    # --- the figures ------------------------------------------------------------------------
    def summary(self, produce_s: float, drain_s: float, statuses: dict) -> dict:
        a = self.args
        run = [x for x in self.samples if x["phase"] == "run"]
        final = self.samples[-1]
        window = min(60.0, produce_s / 4)
        last_run = run[-1]
        before = [x for x in run if x["t"] <= last_run["t"] - window] or run[:1]
        final_fps = (last_run["scored"] - before[-1]["scored"]) / max(last_run["t"] - before[-1]["t"], 1e-9)
        warmup = min(60.0, produce_s / 4)
        rss = {}
        for label in self.samples[0]["rss_kib"]:
            series = [(x["t"], x["rss_kib"][label]) for x in self.samples if label in x["rss_kib"]]
            warm = [v for t, v in series if t >= warmup] or [v for _, v in series]
            first, after, end = series[0][1], warm[0], series[-1][1]
            rss[label] = {"first_kib": first, "after_warmup_kib": after, "end_kib": end,
                          "growth_pct": 100 * (end - after) / after if after else None,
                          "growth_from_first_pct": 100 * (end - first) / first if first else None}
        sent = self.attempted - len(self.failed)
        scored_ids = self.reader.scored
        lost = sum(1 for i in range(self.attempted) if f"soak-{i}" not in scored_ids)
        latencies = self.reader.latencies
        return {
            "rate_fps": a.rate,
            "produce_s": produce_s,
            "produced_fps": self.attempted / produce_s,
            "mean_throughput_fps": last_run["scored"] / max(last_run["t"], 1e-9),
            "final_throughput_fps": final_fps,
            "final_window_s": window,
            "throughput_over_rate": (last_run["scored"] / max(last_run["t"], 1e-9)) / a.rate,
            "max_lag": max(x["lag"] for x in self.samples),
            "lag_at_end_of_production": last_run["lag"],
            "final_lag": final["lag"],
            "max_inversion_lag": max(x["inversion_lag"] for x in self.samples),
            "final_inversion_lag": final["inversion_lag"],
            "drain_s": drain_s,
            "drained": final["lag"] == 0 and lost == 0,
            "latency_s": {"p50": _pct(latencies, 50), "p99": _pct(latencies, 99), "max": max(latencies) if latencies else None,
                          "n": len(latencies)},
            "rss_warmup_s": warmup,
            "rss": rss,
            "frames": {"sent": sent, "send_failed": len(self.failed), "frames_topic_records": final["frames_end_offset"],
                       "scored": len(scored_ids), "score_records": final["score_records"],
                       "duplicated": final["score_records"] - len(scored_ids), "lost": lost,
                       "deadletters": final["deadletters"]},
            "workers_exited": final["exited"],
            "worker_status": {k: {f: v.get(f) for f in ("batches", "frames_scored", "candidates", "published", "bank_size")
                                  if f in v} for k, v in statuses.items()},
        }


# --- output -------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, rate = report["samples"], report["settings"]["rate_fps"]
    t = [x["t"] for x in samples]
    drain_at = next((x["t"] for x in samples if x["phase"] == "drain"), None)
    fig, axes = plt.subplots(3, 1, figsize=(PNG_SIZE[0] / 100, PNG_SIZE[1] / 100), dpi=100, sharex=True)
    lag, rss, fps = axes
    lag.plot(t, [x["lag"] for x in samples], marker=".", label="scoring group on frames")
    lag.set_ylabel("consumer lag (frames)")
    lag.set_ylim(bottom=0)
    inv = lag.twinx()
    inv.plot(t, [x["inversion_lag"] for x in samples], color="tab:red", linestyle="--", linewidth=1,
             label="inversion group on candidates (right)")
    inv.set_ylabel("inversion lag (candidates)", color="tab:red")
    inv.set_ylim(bottom=0)
    inv.legend(loc="upper right", fontsize=8)
    labels = sorted({k for x in samples for k in x["rss_kib"]})
    for label in labels:
        rss.plot([x["t"] for x in samples if label in x["rss_kib"]],
                 [x["rss_kib"][label] / 1024 for x in samples if label in x["rss_kib"]], marker=".", label=label)
    rss.set_ylabel("RSS (MiB)")
    def series(key):
        return [np.nan if x[key] is None else x[key] for x in samples]

    fps.plot(t, series("scored_fps"), marker=".", label="scored / s (per interval)")
    fps.plot(t, series("produced_fps"), linestyle=":", label="produced / s")
    fps.axhline(rate, color="black", linestyle="--", linewidth=1, label=f"target {rate:g} / s")
    fps.set_ylabel("frames / s")
    fps.set_ylim(bottom=0)
    fps.set_xlabel("seconds since the first frame")
    for ax in axes:
        if drain_at is not None:
            ax.axvspan(drain_at, t[-1], color="grey", alpha=0.15, label="drain" if ax is lag else None)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left" if ax is lag else "best", fontsize=8)
    st = report["settings"]
    fig.suptitle(f"soak: {st['model']}, {st['workers']} scoring worker(s) + 1 inversion worker, "
                 f"{rate:g} frames/s for {st['minutes']:g} min")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(report: dict) -> str:
    s, st = report["summary"], report["settings"]
    f = s["frames"]
    lat = s["latency_s"]
    lines = [
        f"soak: {st['model']}, {st['workers']} scoring worker(s), batch {st['batch_size']}, {st['minutes']:g} min at {st['rate_fps']:g} frames/s",
        f"  produced              {s['produced_fps']:.2f} frames/s over {s['produce_s']:.1f} s",
        f"  throughput (scored)   mean {s['mean_throughput_fps']:.2f} frames/s ({100 * s['throughput_over_rate']:.1f} % of the rate), "
        f"last {s['final_window_s']:.0f} s {s['final_throughput_fps']:.2f} frames/s",
        f"  lag (frames)          max {s['max_lag']}, at end of production {s['lag_at_end_of_production']}, "
        f"final {s['final_lag']} (drained in {s['drain_s']:.1f} s)",
        f"  lag (candidates)      max {s['max_inversion_lag']}, final {s['final_inversion_lag']}",
    ]
    if lat["n"]:
        lines.append(f"  send -> score read    p50 {lat['p50']:.3f} s, p99 {lat['p99']:.3f} s, max {lat['max']:.3f} s")
    lines.append(f"  RSS (after {s['rss_warmup_s']:.0f} s warm-up -> end)")
    for label, r in s["rss"].items():
        lines.append(f"    {label:10s} {r['first_kib'] / 1024:8.1f} MiB first, {r['after_warmup_kib'] / 1024:8.1f} -> "
                     f"{r['end_kib'] / 1024:8.1f} MiB ({r['growth_pct']:+.2f} %)")
    lines.append(f"  frames                sent {f['sent']}, scored {f['scored']}, duplicated {f['duplicated']}, "
                 f"lost {f['lost']}, send failures {f['send_failed']}, dead letters {f['deadletters']}")
    if s["workers_exited"]:
        lines.append(f"  EXITED during the run: {', '.join(s['workers_exited'])}")
    return "\n".join(lines)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--rate", type=float, required=True, help="frames per second, paced")
    parser.add_argument("--model", default="interneg-tiny", help="interneg-tiny or ViT-B-32 (random weights)")
    parser.add_argument("--workers", type=int, default=1, help="scoring workers")
    parser.add_argument("--batch", type=int, default=32, help="scoring-worker batch size")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--drain-s", type=float, default=120.0, help="longest wait for the lag to reach 0 after production")
    parser.add_argument("--settle-s", type=float, default=3.0, help="wait after the workers are ready, before the first frame")
    parser.add_argument("--lexicon-sample", type=int, default=6000)
    parser.add_argument("--out", default="bench/soak")
    parser.add_argument("--keep-workdir", action="store_true", help="keep worker logs (the broker's data is always removed)")
    parser.add_argument("--verbose", action="store_true", help="a line per sample")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.minutes <= 0 or args.workers < 1:
        parser.error("--rate and --minutes must be positive, --workers at least 1")

    from bench.pipeline_bench import machine_info
    from bench.run import bench_bundle
    from pipeline.model import load_model

    signal.signal(signal.SIGTERM, _raise_interrupt)  # cleaned up like Ctrl-C
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="interneg-soak-"))
    settings = Settings(_env_file=None)
    settings.model = ModelSettings(name=args.model, pretrained="", device="auto")
    settings.cache_dir = work / "cache"
    settings.worker.batch_size = args.batch
    settings.topics.partitions = max(settings.topics.partitions, args.workers)
    ok = False
    try:
        loaded = load_model(settings.model)
        machine = machine_info(loaded)
        settings.worker.bundle = bench_bundle(loaded, settings, work / "bundle", args.lexicon_sample)
        model_id = loaded.model_id
        del loaded
        with Deployment(settings, work) as deployment:
            s = deployment.fresh_topics()
            print(f"broker {s.kafka.bootstrap_servers}, topics {s.topics.frames} ..., work dir {work}", flush=True)
            soak = Soak(deployment, s, args)
            summary = soak.run()
            samples = soak.samples
        report = {
            "settings": {"model": model_id, "minutes": args.minutes, "rate_fps": args.rate, "workers": args.workers,
                         "batch_size": args.batch, "batch_timeout_ms": settings.worker.batch_timeout_ms,
                         "partitions": settings.topics.partitions, "sample_s": args.sample_s, "drain_s": args.drain_s,
                         "lexicon_sample": args.lexicon_sample,
                         "command": "python -m bench.soak " + " ".join(sys.argv[1:] if argv is None else argv)},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": {**machine, "load_average_1m_end": round(os.getloadavg()[0], 2)},
            "summary": summary,
            "samples": samples,
        }
        (out / "soak.json").write_text(json.dumps(report, indent=1, default=str))
        plot(report, out / "soak.png")
        print(table(report))
        print(f"wrote {out / 'soak.json'} and {out / 'soak.png'}")
        ok = summary["frames"]["lost"] == 0 and summary["frames"]["send_failed"] == 0
        return 0 if ok else 1
    finally:
        for broker_dir in work.glob("kafka-*"):  # the broker is stopped by now; its data can be gigabytes
            shutil.rmtree(broker_dir, ignore_errors=True)
        if ok and not args.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"worker logs kept in {work / 'logs'}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
