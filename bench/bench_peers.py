"""Our server against BentoML and MLServer serving the same bundle, driven by the same client, in one run.

Every server gets the bundle's fp32 ONNX graph and our preprocessing function (the peers import
`food_classifier.preprocessing` from this repository), and real Food-101 JPEGs at several concurrencies,
one photo per request, each in the input form the server takes best:

- ours: the photo as the raw request body (`POST /predict`, `image/jpeg`), default settings;
- ours-oip: the same server through the Open Inference Protocol, JSON with a base64 BYTES element
  (`POST /v2/models/{name}/infer`): exactly the request MLServer gets;
- bentoml: BentoML 1.4, `@bentoml.service` with an ONNX Runtime session, adaptive batching on (up to
  16 images), the photo as a multipart file (`pathlib.Path` input) (bench/peers/bento_service.py);
- mlserver: MLServer with a custom runtime around ONNX Runtime, adaptive batching on, OIP JSON with a
  base64 BYTES element (bench/peers/mlserver_runtime.py).

The peers install into their own venvs under `--work` (`python3.11 -m venv`, pip), never into ours; a
peer that fails to install or start is skipped with the reason. The peers get the thread layout of ours
(`--workers` processes, `--threads` ONNX Runtime threads each; ours: 2 model calls at once, 1 thread
each). All servers are started, then each level runs against each server in turn, one at a time, so a
change in the machine's load hits all alike. Per row: img/s, p50/p99 latency, server CPU per image and
peak memory summed over the server's processes (RSS, and PSS, which counts shared pages once), mean
images per model call, answers that agree with `Classifier`, and img/s relative to ours.

    python bench/bench_peers.py                       # the built-in bundle (Lite0), 1/8/32 concurrent
    python bench/bench_peers.py --bundle models/food --requests 300 --out peers.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_serving import DATA, load_images, stats  # noqa: E402

from food_classifier.bundle import load_newest  # noqa: E402
from food_classifier.inference import Classifier  # noqa: E402
from food_classifier.testing import free_port  # noqa: E402

PEERS = ROOT / "bench" / "peers"
PACKAGES = {"bentoml": ["bentoml>=1.4,<1.5", "onnxruntime", "numpy", "pillow"],
            # uvloop 0.22+ makes MLServer 1.7.1's inference worker die at start (get_event_loop in a process)
            "mlserver": ["mlserver", "onnxruntime", "numpy", "pillow", "uvloop<0.22"]}
BATCH_METRIC = {"ours": "food_classifier_batch_size", "ours-oip": "food_classifier_batch_size",
                "bentoml": "bentoml_service_adaptive_batch_size"}  # histogram: _sum / _count = mean batch


@dataclass
class Server:
    name: str
    cmd: list[str]
    url: str
    ready: str  # path that answers 200 once the model is loaded
    form: str  # the input form, for the table
    env: dict[str, str]
    cwd: Path | None = None


def ensure_venv(work: Path, name: str) -> Path:
    """The peer's own venv under `work`, created and filled once; raises with pip's last lines on failure."""
    venv, marker = work / name, work / name / ".installed"
    if marker.is_file():
        return venv / "bin"
    subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
    log = work / f"{name}.install.log"
    with open(log, "w") as out:
        rc = subprocess.run([str(venv / "bin" / "pip"), "install", *PACKAGES[name]], stdout=out,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"pip install {' '.join(PACKAGES[name])} failed: "
                           + " | ".join(log.read_text().strip().splitlines()[-3:]))
    marker.write_text(" ".join(PACKAGES[name]))
    return venv / "bin"


def servers(work: Path, bundle: Path, config: Path, model: str, peers: list[str], workers: int) -> list[Server | str]:
    """What to start, or a string saying why a peer is skipped."""
    env = {"FC_PEER_CONFIG": str(config), "PYTHONPATH": os.pathsep.join([str(PEERS), str(ROOT)]),
           "FC_BENTO_WORKERS": str(workers)}
    port = free_port()
    ours = [sys.executable, "-m", "food_classifier.cli", "serve", str(bundle), "--host", "127.0.0.1",
            "--port", str(port), "--cache-bytes", "0"]  # the photos repeat: no prediction cache, for every server
    out: list[Server | str] = [Server("ours", ours, f"http://127.0.0.1:{port}", "/readyz", "raw JPEG body",
                                      {"PYTHONPATH": str(ROOT)})]
    if "ours-oip" in peers:
        out.append(Server("ours-oip", ours, out[0].url, "/readyz", "OIP JSON, base64 BYTES",
                          {"PYTHONPATH": str(ROOT)}))
    for name in ("bentoml", "mlserver"):
        if name not in peers:
            continue
        try:
            bin_dir = ensure_venv(work, name)
        except Exception as exc:  # no network, a resolver conflict...
            out.append(f"{name}: skipped, {exc}")
            continue
        port = free_port()
        if name == "bentoml":
            cmd = [str(bin_dir / "bentoml"), "serve", "bento_service:FoodClassifier", "--host", "127.0.0.1",
                   "--port", str(port)]
            out.append(Server(name, cmd, f"http://127.0.0.1:{port}", "/readyz", "multipart file (Path)",
                              {**env, "BENTOML_HOME": str(work / "bentoml_home"), "BENTOML_DO_NOT_TRACK": "true"},
                              PEERS))
        else:
            folder = work / "mlserver_model"
            folder.mkdir(exist_ok=True)
            (folder / "settings.json").write_text(json.dumps({
                "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
                "parallel_workers": workers}))
            (folder / "model-settings.json").write_text(json.dumps({
                "name": model, "implementation": "mlserver_runtime.FoodRuntime",
                "max_batch_size": 16, "max_batch_time": 0.002}))
            out.append(Server(name, [str(bin_dir / "mlserver"), "start", str(folder)], f"http://127.0.0.1:{port}",
                              f"/v2/models/{model}/ready", "OIP JSON, base64 BYTES", env))
    return out


def tree(pid: int) -> list[int]:
    """The process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parts = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(parts[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def memory_mb(pids: list[int], key: str) -> float:
    """Sum of `key` (Rss or Pss) over the processes, MiB."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class MemorySampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.rss, self.pss, self.done = pid, 0.0, 0.0, threading.Event()

    def run(self) -> None:
        """Every 0.25 s; the process tree (a walk of all of /proc) only every 2 s: on 2 cores a sampler that
        walks /proc 10 times a second took CPU from the server it measures."""
        pids, walked = tree(self.pid), time.monotonic()
        while not self.done.is_set():
            if time.monotonic() - walked > 2:
                pids, walked = tree(self.pid), time.monotonic()
            self.rss = max(self.rss, memory_mb(pids, "Rss"))
            self.pss = max(self.pss, memory_mb(pids, "Pss"))
            time.sleep(0.25)


def sender(server: Server, client: httpx.AsyncClient, model: str):
    """`send(photo) -> label` in the server's input form."""
    async def ours(photo: bytes) -> str:
        r = await client.post(server.url + "/predict", content=photo, headers={"content-type": "image/jpeg"})
        return r.raise_for_status().json()["label"]

    async def oip(photo: bytes) -> str:
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                            "data": [base64.b64encode(photo).decode()]}], "outputs": [{"name": "label"}]}
        r = await client.post(f"{server.url}/v2/models/{model}/infer", json=body)
        return next(o for o in r.raise_for_status().json()["outputs"] if o["name"] == "label")["data"][0]

    async def bento(photo: bytes) -> str:
        r = await client.post(server.url + "/classify", files={"images": ("photo.jpg", photo, "image/jpeg")})
        answer = r.raise_for_status().json()
        return (answer[0] if isinstance(answer, list) else answer)["label"]

    return {"ours": ours, "ours-oip": oip, "mlserver": oip, "bentoml": bento}[server.name]


def wrk_request(server: Server, model: str, photo: bytes) -> tuple[str, str, bytes]:
    """(path, content type, body) of one request in the server's input form, for wrk."""
    if server.name in ("ours-oip", "mlserver"):
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                            "data": [base64.b64encode(photo).decode()]}], "outputs": [{"name": "label"}]}
        return f"/v2/models/{model}/infer", "application/json", json.dumps(body).encode()
    if server.name == "bentoml":
        boundary = "fcbenchboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"photo.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
        return "/classify", f"multipart/form-data; boundary={boundary}", body
    return "/predict", "image/jpeg", photo


def drive_wrk(server: Server, model: str, photos: list[tuple[bytes, str]], concurrency: int, seconds: float,
              work: Path) -> dict:
    """The same load from wrk (C, one thread): on 2 cores a Python client takes ~0.4 of them from the server."""
    folder = work / f"wrk-{server.name}"
    folder.mkdir(exist_ok=True)
    names = []
    for i, (photo, _) in enumerate(photos):
        path, ctype, body = wrk_request(server, model, photo)
        (folder / f"{i}.bin").write_bytes(body)
        names.append(str(folder / f"{i}.bin"))
    (folder / "bodies.txt").write_text("\n".join(names) + "\n")
    env = {**os.environ, "WRK_BODIES": str(folder / "bodies.txt"), "WRK_PATH": path, "WRK_CTYPE": ctype}
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:.0f}s", "--latency", "--timeout", "30s",
                          "-s", str(PEERS / "wrk_post.lua"), server.url], env=env, capture_output=True, text=True,
                         check=True).stdout
    def ms(label: str) -> float:
        value = next(line.split()[1] for line in out.splitlines() if line.strip().startswith(label))
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
        unit = next(u for u in ("us", "ms", "s") if value.endswith(u))
        return round(float(value[:-len(unit)]) * scale[unit], 2)
    done = int(next(line.split()[0] for line in out.splitlines() if "requests in" in line))
    bad = sum(int(line.split(":")[1]) for line in out.splitlines() if "Non-2xx" in line)
    total = float(next(line.split()[3].rstrip("s,") for line in out.splitlines() if "requests in" in line))
    return {"img_per_s": round((done - bad) / total, 1), "p50_ms": ms("50%"), "p95_ms": float("nan"),
            "p99_ms": ms("99%"), "requests": done, "errors": bad, "images": done - bad, "agree": "-"}


async def drive(send, photos: list[tuple[bytes, str]], concurrency: int, requests: int) -> dict:
    latencies: list[float] = []
    errors = agree = 0
    counter = iter(range(requests))

    async def worker(w: int) -> None:
        nonlocal errors, agree
        for i in counter:
            photo, want = photos[(i + w * 7) % len(photos)]
            t = time.perf_counter()
            try:
                label = await send(photo)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t)
            agree += label == want

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    row = stats(latencies, len(latencies), time.perf_counter() - start, errors)
    row["agree"] = f"{agree}/{len(latencies)}"
    return row


def start(server: Server, work: Path, timeout: float = 180) -> subprocess.Popen:
    log = open(work / f"{server.name}.server.log", "wb")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(server.cmd, cwd=server.cwd, env={**os.environ, **server.env}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}, see {log.name}")
        try:
            if httpx.get(server.url + server.ready, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"not ready after {timeout} s, see {log.name}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group (peers run workers), then SIGKILL if it hangs."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def batch_totals(server: Server) -> tuple[float, float]:
    """(images, model calls) so far, from the server's batch-size histogram; (0, 0) if it has none."""
    metric = BATCH_METRIC.get(server.name)
    if metric is None:
        return 0.0, 0.0
    total = {"_sum": 0.0, "_count": 0.0}
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        for suffix in total:
            if line.startswith(metric + suffix):
                total[suffix] += float(line.rsplit(" ", 1)[1])
    return total["_sum"], total["_count"]


async def level(server: Server, pid: int, send, photos, concurrency: int, requests: int, wrk: dict | None) -> dict:
    """One concurrency level against one server: throughput, latency, its CPU, memory and batches."""
    sampler = MemorySampler(pid)
    sampler.start()
    pids = tree(pid)
    cpu0, batch0 = cpu_seconds(pids), await asyncio.to_thread(batch_totals, server)
    if wrk is None:
        row = await drive(send, photos, concurrency, requests)
    else:
        row = await asyncio.to_thread(drive_wrk, server, wrk["model"], photos, concurrency, wrk["seconds"],
                                      wrk["work"])
    sampler.done.set()
    sampler.join()
    row["server_cpu_ms_img"] = round((cpu_seconds(pids) - cpu0) / max(1, row["images"]) * 1000, 1)
    batch1 = await asyncio.to_thread(batch_totals, server)
    calls = batch1[1] - batch0[1]
    row["mean_batch"] = round((batch1[0] - batch0[0]) / calls, 1) if calls else "-"
    return {"server": server.name, "input": server.form, "concurrency": concurrency, **row,
            "peak_rss_mb": round(sampler.rss, 1), "peak_pss_mb": round(sampler.pss, 1)}


async def bench(running: list[tuple[Server, int]], model: str, photos, levels: list[int], requests: int,
                wrk: dict | None = None) -> list[dict]:
    """Every level against every server in turn (all started), so a change in the machine's load hits
    all of them alike rather than whichever ran last."""
    rows = []
    limits = httpx.Limits(max_connections=max(levels) + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        senders = [(server, pid, sender(server, client, model)) for server, pid in running]
        for _, _, send in senders:
            await drive(send, photos, 4, 16)  # warm-up: connections, threads, first batches
        for c in levels:
            for server, pid, send in senders:
                rows.append(await level(server, pid, send, photos, c, max(requests, 4 * c), wrk))
                print(f"{server.name} at {c}: {rows[-1]['img_per_s']} img/s", flush=True)
    return rows


def table(rows: list[dict], cpus: int) -> str:
    """Also derived: `cores_used` (CPU the server got per second of the run: on a shared machine img/s is
    this share divided by the CPU per image) and `cpu_bound_img_s` (what `cpus` idle cores would allow)."""
    ours = {r["concurrency"]: r["img_per_s"] for r in rows if r["server"] == "ours"}
    cols = ["server", "input", "concurrency", "img_per_s", "vs_ours", "p50_ms", "p99_ms", "server_cpu_ms_img",
            "cores_used", "cpu_bound_img_s", "peak_rss_mb", "peak_pss_mb", "mean_batch", "errors", "agree"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        r["vs_ours"] = f"{r['img_per_s'] / ours[r['concurrency']]:.2f}x" if ours.get(r["concurrency"]) else "-"
        r["cores_used"] = round(r["img_per_s"] * r["server_cpu_ms_img"] / 1000, 2)
        r["cpu_bound_img_s"] = round(cpus * 1000 / r["server_cpu_ms_img"], 1) if r["server_cpu_ms_img"] else "-"
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="bundle or model dir (default: the built-in Lite0 bundle)")
    p.add_argument("--photos", type=Path, default=DATA, help="ImageFolder of JPEGs (Food-101 mini)")
    p.add_argument("--images", type=int, default=64, help="distinct photos sent round-robin")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=160, help="requests per concurrency level (at least 4x it)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of a peer's session (ours: 1)")
    p.add_argument("--workers", type=int, default=2, help="peer worker processes (ours: 2 model calls at once)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fc-bench-peers",
                   help="peers' venvs, configs and logs")
    p.add_argument("--peers", nargs="+", default=["ours-oip", "bentoml", "mlserver"])
    p.add_argument("--out", type=Path, help="also write the rows as JSON")
    p.add_argument("--client", choices=["httpx", "wrk"], default="httpx",
                   help="load generator: httpx in this process (checks every answer), or wrk (apt install wrk; "
                        "C, one thread: leaves the server the other core)")
    p.add_argument("--seconds", type=float, default=20, help="with --client wrk: seconds per level")
    p.add_argument("--table", type=Path, help="only print the table of a run saved with --out")
    args = p.parse_args()
    cpus = len(os.sched_getaffinity(0))
    if args.table:
        saved = json.loads(args.table.read_text())
        print(table(saved["rows"], saved.get("cpus", cpus)))
        return
    if args.bundle is None:
        from food_classifier.builtin import builtin_bundle_path

        args.bundle = builtin_bundle_path(quiet=True)
    args.bundle = Path(args.bundle).resolve()  # the peers run in their own folders: a relative path broke BentoML
    args.work.mkdir(parents=True, exist_ok=True)
    clf = Classifier(load_newest(args.bundle), threads=2)
    b = clf.bundle
    config = args.work / "peer.json"
    config.write_text(json.dumps({"model": str(b.model_file("fp32")), "spec": b.preprocessing.to_dict(),
                                  "labels": b.labels, "temperature": b.temperature, "threads": args.threads}))
    photos = [(data, clf.predict(data).label) for _, data in load_images(args.photos, args.images)]
    if not photos:
        raise SystemExit(f"no photos found under {args.photos} (an ImageFolder of JPEGs; see --photos)")
    print(f"bundle {b.name} {b.version} ({b.meta.arch}, {b.preprocessing.crop} px), {len(photos)} photos; "
          f"CPU: {cpus} cores", flush=True)
    notes: list[str] = []
    running: list[tuple[Server, int]] = []
    procs: dict[str, subprocess.Popen] = {}  # by command line: ours and ours-oip share one process
    try:
        for server in servers(args.work, args.bundle, config, b.name, args.peers, args.workers):
            if isinstance(server, str):
                notes.append(server)
                print(server, flush=True)
                continue
            key = " ".join(server.cmd)
            try:
                procs[key] = procs.get(key) or start(server, args.work)
            except RuntimeError as exc:
                notes.append(f"{server.name}: skipped, {exc}")
                print(notes[-1], flush=True)
                continue
            running.append((server, procs[key].pid))
        wrk = {"model": b.name, "seconds": args.seconds, "work": args.work} if args.client == "wrk" else None
        rows = asyncio.run(bench(running, b.name, photos, args.levels, args.requests, wrk))
    finally:
        for proc in procs.values():
            stop(proc)
    print(table(rows, cpus))
    for note in notes:
        print("-", note)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "notes": notes, "cpus": cpus}, indent=1))


if __name__ == "__main__":
    main()
