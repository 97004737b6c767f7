"""The ``interneg`` command line. Settings come from INTERNEG_* variables and .env.

Only what ``--help`` needs is imported here; each command imports its own modules (torch,
open_clip, kafka, even the settings take seconds or a large part of a second), so that
``interneg --help`` answers at once.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from pipeline.errors import InterNegError

if TYPE_CHECKING:
    from schemas.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Streaming OOD detection with CLIP and InterNeg.")

from pipeline.methods import METHOD_NAMES as METHODS  # the registry; importing it loads no method
PROFILES = ("stream", "paper")
PROFILE_HELP = "paper: the paper's protocol as the released code runs it (lexicon, augmentation, 256/224 crop, no bank de-duplication); stream: the deployment defaults (default: INTERNEG_PROFILE)"


class CliError(InterNegError):
    """A command's options or inputs that cannot work: printed as one line, exit status 2."""


def _settings(model: str | None = None, pretrained: str | None = None, profile: str | None = None) -> Settings:
    from schemas.settings import Settings

    if profile is not None and profile not in PROFILES:
        raise CliError(f"--profile {profile}: choose {' or '.join(PROFILES)}")
    settings = Settings(profile=profile) if profile is not None else Settings()
    if model is not None:
        settings.model.name = model
    if pretrained is not None:
        settings.model.pretrained = pretrained
    return settings


def _method_list(spec: str, option: str) -> list[str]:
    methods = list(METHODS) if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CliError(f"{option}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(METHODS)} or all")
    return methods


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _load_bundle_and_model(bundle_dir: Path, settings: Settings):
    from pipeline.bundle import load_bundle_with_model

    return load_bundle_with_model(bundle_dir, settings.model.device, settings.model.precision, model=settings.model)


@app.command()
def prepare(
    classes: Annotated[Path, typer.Option(help="folder with a sub-folder of example images per class, or a text file of class names")],
    out: Annotated[Path, typer.Option(help="bundle directory to write")],
    model: Annotated[Optional[str], typer.Option(help="open_clip model (overrides INTERNEG_MODEL__NAME)")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="weights tag or local file (overrides INTERNEG_MODEL__PRETRAINED)")] = None,
    profile: Annotated[Optional[str], typer.Option(help=PROFILE_HELP)] = None,
    methods: Annotated[Optional[str], typer.Option(help="methods the bundle carries: a comma list or 'all' (default: INTERNEG_METHOD__BUNDLED: all but csp, the slowest to prepare)")] = None,
) -> None:
    """Build a detector bundle: ID embeddings, prototypes, and each method's negatives."""
    from pipeline.bundle import prepare_bundle, save_bundle
    from pipeline.model import load_model

    settings = _settings(model, pretrained, profile)
    if methods is not None:
        settings.method.bundled = _method_list(methods, "--methods")
    loaded = load_model(settings.model)
    bundle = prepare_bundle(loaded, classes, settings)
    save_bundle(bundle, out)
    info = bundle.info
    _say(
        f"bundle {out}: model {bundle.model_id}, {len(bundle.class_names)} classes, "
        f"{info['lexicon_candidates']} candidates of the {info['lexicon']} lexicon (profile {settings.profile}); negatives: "
        + ", ".join(f"{m} {s.info['negatives']}" for m, s in bundle.methods.items() if "negatives" in s.info)
    )
    if bundle.prototypes is None and "interneg" in bundle.methods:
        _say(f"note: {bundle.methods['interneg'].info['selection_note']}")


def _encode_files(loaded, paths: list[Path], settings: Settings):
    """Embeddings of the images that decode, and (path, reason) for those that do not."""
    import numpy as np
    import torch

    from pipeline.images import ImageRejected, load_image_file

    tensors, kept, rejected = [], [], []
    for path in paths:
        try:
            image = load_image_file(path, max_bytes=settings.images.max_bytes, max_pixels=settings.images.max_pixels)
        except ImageRejected as exc:
            rejected.append((path, str(exc)))
            continue
        tensors.append(loaded.preprocess(image))
        kept.append(path)
    chunks = [
        loaded.encode_images(torch.stack(tensors[i : i + settings.model.image_batch_size])).cpu().numpy()
        for i in range(0, len(tensors), settings.model.image_batch_size)
    ]
    emb = np.concatenate(chunks) if chunks else np.zeros((0, loaded.embed_dim), np.float32)
    return emb, kept, rejected


def _expand(paths: list[Path]) -> list[Path]:
    from pipeline.images import list_images

    files = []
    for path in paths:
        files.extend(list_images(path) if path.is_dir() else [path])
    return files


@app.command()
def score(
    images: Annotated[list[Path], typer.Argument(help="image files or folders")],
    bundle: Annotated[Path, typer.Option(help="detector bundle from 'interneg prepare'")],
    method: Annotated[Optional[str], typer.Option(help=f"{' | '.join(METHODS)} (default: the setting)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Score images: score, verdict, top ID class, and the negatives that weighed most."""
    from pipeline.methods import scorer_from_bundle
    from pipeline.scorers import judge

    settings = _settings()
    loaded_bundle, loaded = _load_bundle_and_model(bundle, settings)
    scorer = scorer_from_bundle(loaded_bundle, settings, method)
    emb, kept, rejected = _encode_files(loaded, _expand(images), settings)
    threshold = settings.method.threshold
    rows = []
    if len(kept):
        result = scorer.score(emb)
        explanations = scorer.explain(emb, settings.method.explain_top)
        for i, path in enumerate(kept):
            rows.append(
                {
                    "file": str(path),
                    "method": scorer.name,
                    "score": round(float(result.score[i]), 6),
                    "verdict": judge(float(result.score[i]), threshold),
                    "id_class": loaded_bundle.class_names[int(result.id_class[i])],
                    "id_prob": round(float(result.id_prob[i]), 6),
                    "negatives": [{"label": label, "cos": round(cos, 4)} for label, cos in explanations[i]],
                }
            )
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        for path, reason in rejected:
            typer.echo(json.dumps({"file": str(path), "error": reason}))
    else:
        typer.echo(f"{'file':40s} {'score':>8s} verdict  top ID class (prob)       weighed most")
        for row in rows:
            negs = ", ".join(n["label"] for n in row["negatives"])
            top = f"{row['id_class']} ({row['id_prob']:.2f})"
            typer.echo(f"{Path(row['file']).name[-40:]:40s} {row['score']:8.4f} {row['verdict']:7s}  {top:24s} {negs}")
        for path, reason in rejected:
            typer.echo(f"{path.name[-40:]:40s} rejected: {reason}")
    _say(f"{len(rows)} scored, {len(rejected)} rejected (threshold {threshold}, method {scorer.name})")
    if rejected:
        raise typer.Exit(1)


def _parse_sets(specs: list[str]) -> dict[str, Path]:
    sets = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, Path(spec).stem
        if name in sets:
            raise CliError(f"--ood {spec}: the set name '{name}' is used twice")
        sets[name] = Path(path)
    return sets


@app.command("eval")
def eval_command(
    bundle: Annotated[Path, typer.Option(help="detector bundle (its model encodes image folders)")],
    id_data: Annotated[Path, typer.Option("--id", help="ID images: a folder or a feature .npz")],
    ood: Annotated[list[str], typer.Option(help="NAME=PATH of an OOD set (folder or .npz); repeat for more")],
    out: Annotated[Path, typer.Option(help="folder for metrics.json, metrics.txt and the plots")] = Path("runs/eval"),
    method: Annotated[str, typer.Option(help=f"{', '.join(METHODS)}, a comma list, or 'all' (those the bundle carries)")] = "all",
    protocol: Annotated[str, typer.Option(help="paper (synchronous, re-score) or async (delayed updates)")] = "paper",
    delay: Annotated[int, typer.Option(help="async: batches before a bank update applies")] = 1,
    batch_size: Annotated[int, typer.Option(help="stream batch size")] = 256,
    seed: Annotated[int, typer.Option(help="shuffle seed of the mixed stream")] = 0,
    profile: Annotated[Optional[str], typer.Option(help=PROFILE_HELP + "; the bundle must be prepared with it")] = None,
    false_alarms: Annotated[float, typer.Option(help="report, and draw on the histograms, the threshold that judges this fraction of ID samples OOD")] = 0.05,
) -> None:
    """Evaluate methods on ID vs OOD sets; print the metrics table and write JSON and plots."""
    from pipeline.bundle import read_manifest
    from pipeline.evaluate import Protocol, evaluate, write_report
    from pipeline.methods import scorer_from_bundle

    settings = _settings(profile=profile)
    methods = _method_list(method, "--method")
    if protocol not in ("paper", "async"):
        raise CliError(f"--protocol {protocol}: choose paper or async")
    proto = Protocol(kind=protocol, batch_size=batch_size, delay=delay, seed=seed)
    manifest = read_manifest(bundle)
    prepared_with = manifest["settings"].get("profile", "stream")
    if profile is not None and prepared_with != profile:
        raise CliError(f"{bundle}: prepared with profile {prepared_with}; prepare it again with --profile {profile}")
    the_bundle, loaded = _bundle_and_encoder(bundle, manifest, settings)
    if loaded is None:  # a simulated world: its stand-in for inversion
        from pipeline.simulate import SimulatedInverter

        extras = the_bundle.extras
        inverter = SimulatedInverter(extras["modality_gap"], seed=settings.inversion.seed, text_mean=extras.get("text_mean"))
    else:
        from pipeline.inversion import TextInverter

        inverter = TextInverter(loaded, settings.inversion, the_bundle.prototypes) if the_bundle.prototypes is not None else None
    id_features = _embeddings("ID", id_data, the_bundle, loaded, settings)
    ood_sets = {name: _embeddings(name, path, the_bundle, loaded, settings) for name, path in _parse_sets(ood).items()}
    if method == "all":  # every method the bundle carries; the others named, not silently dropped
        missing = [m for m in methods if m not in the_bundle.methods]
        methods = [m for m in methods if m in the_bundle.methods]
        if missing:
            _say(f"not in the bundle: {', '.join(missing)} (prepare it with --methods all to compare them too)")
    scorers = {m: scorer_from_bundle(the_bundle, settings, m, inverter) for m in methods}
    if not 0 <= false_alarms < 1:
        raise CliError(f"--false-alarms {false_alarms}: a fraction in [0, 1), e.g. 0.01 for 1 %")
    report = evaluate(scorers, id_features, ood_sets, proto, progress=True, target_rate=false_alarms)
    written = write_report(report, out)
    typer.echo(f"profile {settings.profile}, protocol {protocol}" + (f" (delay {delay} batches)" if protocol == "async" else "")
               + f", batch {batch_size}, {len(id_features)} ID samples")
    typer.echo(report.table())
    typer.echo(report.thresholds())
    for r in report.results:
        if scorers[r.method].adapts:
            a = r.adapt
            refused = ", ".join(f"{n} {why}" for why, n in sorted(a["refused"].items()))
            typer.echo(
                f"{r.method}/{r.ood_set}: {a['candidates']} proposals, {a['inadmissible']} inadmissible, "
                f"{a['admitted']} applied" + (f" ({refused} refused)" if refused else "") + (f", bank {r.bank_size}" if r.bank_size else "")
            )
    _say("wrote " + ", ".join(str(p) for p in written))


def _bundle_and_encoder(bundle_dir: Path, manifest: dict, settings: Settings):
    """The bundle, and the model that encodes images for it (None for a simulated world, which has none)."""
    from pipeline.bundle import load_bundle

    if "modality_gap" in manifest.get("extras", []):
        return load_bundle(bundle_dir), None
    return _load_bundle_and_model(bundle_dir, settings)


def _embeddings(name: str, path: Path, the_bundle, loaded, settings: Settings):
    """A folder of images encoded with the bundle's model, or a feature .npz made with it."""
    from pipeline.features import load_features

    if path.is_dir():
        if loaded is None:
            raise CliError(f"{path}: a simulated bundle has no model to encode images; give a feature .npz")
        emb, kept, rejected = _encode_files(loaded, _expand([path]), settings)
        for file, reason in rejected:
            _say(f"rejected {file}: {reason}")
        _say(f"{name}: {len(kept)} images encoded, {len(rejected)} rejected")
        if not len(kept):
            raise CliError(f"{path}: no usable images")
        return emb
    features, _, model_id = load_features(path)
    if model_id != the_bundle.model_id:
        raise CliError(f"{path}: features made with model {model_id}, the bundle's model is {the_bundle.model_id}")
    return features


@app.command()
def calibrate(
    bundle: Annotated[Optional[Path], typer.Option(help="the detector bundle the camera's workers run (with --normal)")] = None,
    normal: Annotated[Optional[Path], typer.Option(help="the camera's normal frames: a folder of images or a feature .npz")] = None,
    camera: Annotated[Optional[str], typer.Option(help="instead of --normal: this camera's scores on the scores topic, from --since to --until")] = None,
    since: Annotated[Optional[str], typer.Option(help="with --camera: start of a time the camera saw only normal scenes (ISO 8601, e.g. 2026-11-29T08:00Z)")] = None,
    until: Annotated[Optional[str], typer.Option(help="with --camera: its end (default now)")] = None,
    false_alarms: Annotated[float, typer.Option(help="the fraction of normal frames that may be judged OOD, e.g. 0.01")] = 0.01,
    method: Annotated[Optional[str], typer.Option(help=f"{' | '.join(METHODS)} (default: the setting)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="also write the result here as JSON")] = None,
    bootstrap: BootstrapOption = None,
) -> None:
    """The threshold at which a target fraction of a camera's normal frames would alert.

    From a folder of its normal frames (--bundle and --normal), or from the scores the
    workers recorded for it over a time it saw only normal scenes (--camera, --since).
    """
    import numpy as np

    from pipeline.metrics import alarm_rate, threshold_for_rate

    if not 0 <= false_alarms < 1:
        raise CliError(f"--false-alarms {false_alarms}: a fraction in [0, 1), e.g. 0.01 for 1 %")
    if (normal is None) == (camera is None):
        raise CliError("give either --bundle and --normal (a folder of normal frames) or --camera and --since (the scores topic)")
    settings = _worker_settings(None, bootstrap, None)
    if camera is not None:
        if since is None:
            raise CliError("--camera needs --since: the start of a time the camera saw only normal scenes")
        from workers.score_history import camera_scores

        since_ms, until_ms = _time_ms(since, "--since"), _time_ms(until, "--until") if until else None
        recorded = camera_scores(settings, camera, since_ms, until_ms if until_ms is not None else 2**62)
        wanted = method or settings.method.method
        scores = np.array([s.score for s in recorded if s.method == wanted], dtype=np.float64)
        if len(scores) == 0:
            raise CliError(f"no {wanted} scores of camera {camera!r} on {settings.topics.scores} from {since} to {until or 'now'}")
        name, source = wanted, {"camera": camera, "since": since, "until": until, "topic": settings.topics.scores}
    else:
        if bundle is None:
            raise CliError("--normal needs --bundle: the bundle the camera's workers run")
        from pipeline.bundle import read_manifest
        from pipeline.methods import scorer_from_bundle

        loaded_bundle, loaded = _bundle_and_encoder(bundle, read_manifest(bundle), settings)
        emb = _embeddings("normal", normal, loaded_bundle, loaded, settings)
        scorer = scorer_from_bundle(loaded_bundle, settings, method)
        # the state the workers start from; an adaptive method's state moves as it runs
        scores = scorer.score(np.asarray(emb, dtype=np.float32)).score
        name, source = scorer.name, {"bundle": str(bundle), "model_id": loaded_bundle.model_id}
    threshold = threshold_for_rate(scores, false_alarms)
    margin = float(np.sqrt(max(false_alarms * (1 - false_alarms), 1e-12) / len(scores)))
    result = {
        "method": name, "threshold": threshold, "target_false_alarms": false_alarms, "frames": len(scores),
        "false_alarms_on_these_frames": alarm_rate(scores, threshold), "sampling_error": margin, **source,
    }
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(f"INTERNEG_METHOD__THRESHOLD={threshold:.6g}")
    _say(f"{name}: {len(scores)} normal frames, {100 * result['false_alarms_on_these_frames']:.2f} % of them below it "
         f"(target {100 * false_alarms:g} %; on other normal frames expect the target within about {100 * margin:.2f} points)")


def _time_ms(text: str, option: str) -> int:
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"{option} {text!r}: not an ISO 8601 time such as 2026-11-29T08:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="folder for the simulated bundle and feature files")] = Path("runs/simulated"),
    seed: Annotated[int, typer.Option(help="simulation seed")] = 0,
    profile: Annotated[Optional[str], typer.Option(help=PROFILE_HELP)] = None,
) -> None:
    """Write a simulated CLIP world: a bundle and ID/OOD feature files for 'interneg eval'."""
    from pipeline.simulate import SimulationParams, write_simulation

    paths = write_simulation(SimulationParams(seed=seed), out, _settings(profile=profile))
    for path in paths:
        _say(f"wrote {path}")


def _worker_settings(bundle: Path | None, bootstrap: str | None, http_port: int | None) -> Settings:
    settings = _settings()
    if bundle is not None:
        settings.worker.bundle = bundle
    if bootstrap is not None:
        settings.kafka.bootstrap_servers = bootstrap
    if http_port is not None:
        settings.worker.http_port = http_port
    return settings


BundleOption = Annotated[Optional[Path], typer.Option(help="detector bundle (default INTERNEG_WORKER__BUNDLE)")]
BootstrapOption = Annotated[Optional[str], typer.Option(help="Kafka bootstrap servers (default INTERNEG_KAFKA__BOOTSTRAP_SERVERS)")]
PortOption = Annotated[Optional[int], typer.Option(help="port of /metrics /healthz /readyz /status (0: a free one)")]


@app.command()
def topics(bootstrap: BootstrapOption = None) -> None:
    """Create the topics (idempotent) with their partitions, compaction, retention and size limits."""
    from workers.topics import ensure_topics

    for name, action in ensure_topics(_worker_settings(None, bootstrap, None)).items():
        typer.echo(f"{name}: {action}")


@app.command()
def keygen(out: Annotated[Path, typer.Argument(help="folder for negatives-signing.pem (private, mode 600) and negatives-verify.pem")]) -> None:
    """Make the Ed25519 key pair of the negatives topic: the signing key for the inversion
    worker (INTERNEG_BANK__SIGNING_KEY), the verify key for every worker (INTERNEG_BANK__VERIFY_KEY)."""
    from workers.signing import generate_keypair

    private, public = generate_keypair(out)
    typer.echo(f"INTERNEG_BANK__SIGNING_KEY={private.resolve()}")
    typer.echo(f"INTERNEG_BANK__VERIFY_KEY={public.resolve()}")


@app.command("score-worker")
def score_worker(bundle: BundleOption = None, bootstrap: BootstrapOption = None, http_port: PortOption = None) -> int:
    """Run a scoring worker: frames -> scores, alerts, candidates (stops cleanly on SIGTERM)."""
    from workers.scoring_worker import run_scoring_worker

    return run_scoring_worker(_worker_settings(bundle, bootstrap, http_port))


@app.command("invert-worker")
def invert_worker(bundle: BundleOption = None, bootstrap: BootstrapOption = None, http_port: PortOption = None) -> int:
    """Run an inversion worker: candidates -> inverted negatives on the compacted topic."""
    from workers.inversion_worker import run_inversion_worker

    return run_inversion_worker(_worker_settings(bundle, bootstrap, http_port))


@app.command("events-worker")
def events_worker(bootstrap: BootstrapOption = None, http_port: PortOption = None) -> int:
    """Group each camera's alerts into events (opened / updated / closed), kept in Kafka across restarts."""
    from workers.events_worker import run_events_worker

    return run_events_worker(_worker_settings(None, bootstrap, http_port))


@app.command()
def ui(
    store: Annotated[Optional[str], typer.Option(help="review store: sqlite:///path.db or postgresql://user@host/db (default: sqlite in the cache folder)")] = None,
    host: Annotated[str, typer.Option(help="address to serve on; loopback unless the page is put behind an authenticating proxy")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the review page")] = 8080,
    operator: Annotated[str, typer.Option(help="name recorded with each verdict")] = "operator",
    bootstrap: BootstrapOption = None,
) -> int:
    """The review page: events per camera with snapshots; "normal" allow-lists a frame for every scoring worker."""
    from workers.review_ui import serve_review

    return serve_review(_worker_settings(None, bootstrap, None), store_url=store, host=host, port=port, operator=operator, echo=typer.echo)


@app.command()
def rollout(
    bundle: Annotated[Path, typer.Argument(help="the bundle every scoring worker should run, at a path the workers see (a shared volume)")],
    by: Annotated[str, typer.Option(help="name recorded with the rollout")] = "operator",
    bootstrap: BootstrapOption = None,
) -> int:
    """Roll a detector bundle out to the running scoring workers, without a restart.

    The bundle is checked here first (every file against its manifest); each worker loads it
    between batches, checks it again against the manifest's sha256 sent with it, and goes on
    with the bundle it runs if it cannot (a line in its log, /status says why).
    """
    import time

    from pipeline.bundle import load_bundle, manifest_digest
    from schemas.messages import BundleRollout
    from workers.control import rollout_output
    from workers.delivery import send_and_confirm
    from workers.kafka_clients import make_producer

    path = bundle.resolve()
    load_bundle(path)  # refused here, before any connection, if a file does not match its manifest
    settings = _worker_settings(None, bootstrap, None)
    record = BundleRollout(path=str(path), manifest_sha256=manifest_digest(path), by=by, applied_ms=int(time.time() * 1000))
    producer = make_producer(settings.kafka)
    try:
        send_and_confirm(producer, [rollout_output(settings.topics.control, record)])
    finally:
        producer.close(timeout=10)
    typer.echo(f"rolled out {path} (manifest sha256 {record.manifest_sha256[:16]}…): scoring workers adopt it between batches")
    return 0


cameras_app = typer.Typer(no_args_is_help=True, help="Per-camera settings (threshold, region of interest, event rules), live through ood.control.")
app.add_typer(cameras_app, name="cameras")


@cameras_app.command("apply")
def cameras_apply(
    file: Annotated[Path, typer.Argument(help="the cameras file (TOML, [cameras.<id>] sections; see workers/cameras.py)")],
    by: Annotated[str, typer.Option(help="name recorded with the change")] = "operator",
    bootstrap: BootstrapOption = None,
) -> int:
    """Check the whole file, then send each changed camera's settings to the running workers."""
    from workers.cameras import apply_cameras, load_cameras_file

    load_cameras_file(file)  # refused before any connection
    for line in apply_cameras(_worker_settings(None, bootstrap, None), file, by):
        typer.echo(line)
    return 0


@cameras_app.command("show")
def cameras_show(bootstrap: BootstrapOption = None) -> int:
    """The cameras' own settings the workers use now."""
    from workers.cameras import current_cameras

    for camera_id, config in sorted(current_cameras(_worker_settings(None, bootstrap, None)).items()):
        typer.echo(f"{camera_id}: {config.settings.model_dump(exclude_none=True)} (from {config.source or '?'} by {config.by or '?'})")
    return 0


@app.command("produce")
def produce_command(
    sources: Annotated[list[str], typer.Argument(help="image files, folders of images, video files, or one live source: an rtsp(s):// or http(s):// stream URL, a video device /dev/videoN")],
    rate: Annotated[Optional[float], typer.Option("--rate", "--fps", help="frames per second at most; from a video or live source, the frames sampled (default: every frame, as fast as possible)")] = None,
    camera: Annotated[str, typer.Option(help="camera id: the record key and the camera-id header")] = "camera-0",
    loop: Annotated[int, typer.Option(help="passes over the sources; 0 repeats until --limit or Ctrl-C")] = 1,
    limit: Annotated[Optional[int], typer.Option(help="stop after this many frames")] = None,
    validate: Annotated[bool, typer.Option(help="skip (and count) files that are not images")] = True,
    bootstrap: BootstrapOption = None,
) -> int:
    """Send images, video frames or a live camera's frames to the frames topic with the documented
    headers. SIGTERM or Ctrl-C stops it: what was sent is flushed and the summary printed."""
    from workers.live_source import live_source
    from workers.producer import produce, stop_on_signals

    if len(sources) == 1 and live_source(sources[0]):  # a bad address is refused here, before any connection
        from workers.ops import configure_logging

        configure_logging()  # a live source logs going offline, coming back, reconnecting
    with stop_on_signals() as stop:
        report = produce(_worker_settings(None, bootstrap, None), sources, rate=rate, camera_id=camera, loop=loop, limit=limit, validate=validate, stop=stop)
    for skipped in report.skipped:
        _say(f"skipped {skipped.source}: {skipped.reason}: {skipped.detail}")
    typer.echo(report.summary())
    return 0


@app.command("tail")
def tail_command(
    topic: Annotated[Optional[str], typer.Option(help="topic to read (default: the alerts topic); the dead-letter topic shows each record's reason, detail and source")] = None,
    from_beginning: Annotated[bool, typer.Option(help="start at the oldest record instead of now")] = False,
    max_records: Annotated[Optional[int], typer.Option(help="stop after this many")] = None,
    idle_timeout: Annotated[Optional[float], typer.Option(help="stop after this many seconds without a record")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
    bootstrap: BootstrapOption = None,
) -> int:
    """Print alerts as they arrive."""
    from workers.tail import tail

    tail(_worker_settings(None, bootstrap, None), topic=topic, from_beginning=from_beginning, max_records=max_records, timeout_s=idle_timeout, as_json=as_json)
    return 0


@app.command("local-run")
def local_run_command(
    classes: Annotated[Optional[Path], typer.Option(help="class folder (one sub-folder of examples per class) or class list")] = None,
    frames: Annotated[Optional[Path], typer.Option(help="folder (or video) of frames to stream")] = None,
    out: Annotated[Path, typer.Option(help="working folder: broker data, bundle, logs")] = Path("runs/local"),
    bootstrap: BootstrapOption = None,
    rate: Annotated[Optional[float], typer.Option(help="frames per second to stream")] = None,
) -> int:
    """The whole loop here: broker, topics, bundle, a scoring and an inversion worker, a stream, a summary.

    Without model variables it runs CLIP ViT-B/16 (OpenAI weights) when those are on this
    machine, and otherwise the small model shipped with the project, on its rendered demo
    (known farm animals, unknown animals and things it never trained on).
    """
    from workers.local_run import check_inputs, demo_model, local_run

    settings = _settings()
    # before demo_model: it loads torch and open_clip, and a typo must not wait for them
    check_inputs(settings, classes=classes, frames=frames, out=out, bootstrap=bootstrap)
    note, samples = demo_model(settings)
    return local_run(
        settings, classes=classes or samples / "classes", frames=frames or samples / "frames",
        out=out, bootstrap=bootstrap, rate=rate, echo=typer.echo, model_note=note,
    ).exit_code


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="working folder of the demo")] = Path("runs/demo"),
) -> None:
    """The offline demo end to end: simulated evaluation of all methods, then the tiny model on generated images."""
    from workers.demo import run_demo

    return run_demo(out, echo=typer.echo)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. A failure the user can fix prints one 'error:' line, exit status 2; any
    other exception is a bug: its traceback and a line saying so, exit status 1."""
    import click

    try:
        result = app(args=argv, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        _say("aborted")
        return 130
    except Exception as exc:
        message = _user_error(exc)
        if message is None:
            traceback.print_exc()
            _say("interneg: this is a bug; please report it with the traceback above")
            return 1
        _say(f"error: {message}")
        return 2
    return result if isinstance(result, int) else 0


def _user_error(exc: Exception) -> str | None:
    """The one line for a failure the user can fix, or None for a bug."""
    # imported here, not at the top: pydantic and kafka would slow every --help
    from kafka.errors import KafkaError
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    if isinstance(exc, SettingsError):  # an INTERNEG_* variable that does not parse (a list that is not JSON)
        return f"invalid settings: {exc}"
    if isinstance(exc, InterNegError):
        return str(exc)
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        if exc.title == "Settings":  # name the variable a user sets, with the value it had
            variable = "INTERNEG_" + "__".join(str(part).upper() for part in error["loc"])
            return f"invalid settings: {variable}={str(error.get('input'))[:80]}: {error['msg']}"
        return f"invalid settings: {error['loc']}: {error['msg']}"
    if isinstance(exc, KafkaError):  # what escapes the clients is the cluster being unreachable or refusing
        return f"Kafka: {exc} (check INTERNEG_KAFKA__BOOTSTRAP_SERVERS / --bootstrap and that the brokers are up)"
    if isinstance(exc, OSError):  # a missing or unreadable file
        return str(exc)
    return None


if __name__ == "__main__":
    sys.exit(main())
