"""Can training read pre-encoded shards fast enough, and how fast does the data pipeline encode clips?

Training reads webdataset shards and turns every raw sample into tensors with ``svi_infer.schema.from_members``
(safetensors decode plus the full ``validate``: metadata, shapes and a finiteness check of every tensor). That
must not be much slower than reading the tar bytes themselves, or the loader and not the disk sets the pace.
This benchmark writes 48 synthetic samples at the REAL size of an 81-frame 480x832 Wan 2.1 I2V clip (latents
and one conditioning tensor [16, 21, 60, 104], text [120, 4096], CLIP image [257, 1280], all bf16, ~10 MB a
sample) into shards with ``webdataset.ShardWriter``, reads the files once so the page cache holds them for
every pass alike, then times, interleaved (order alternating) and best of 5:

- (a) the training read path: ``WebDataset`` iterated and each sample passed through ``from_members``;
- (b) the same ``WebDataset`` without decoding (each member's bytes touched), and plain ``tarfile`` reading;

plus two what-if variants of (a) for diagnosis (no finiteness check; ``torch.aminmax`` as the check), and breaks
one ``from_members`` down into its parts (json, safetensors load, ``validate`` with and without the finiteness
check, cheaper equivalents of that check). Then it runs the real data stages (scan, encode, pack) on a few
synthetic 160x96 mp4 clips with the tiny random-weight model (CPU, no downloads) and reports windows encoded per
second of the encode stage (after a 1-window warm-up; fastest of 2 runs).

Run: ``.venv/bin/python bench/data_throughput.py``. Ends with one line of ``name=value`` figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from machine_load import busy_cpu_s  # noqa: E402  (bench/ is on sys.path when run as a script)

LATENT_SHAPE = (16, 21, 60, 104)  # 81 frames at 480x832 through the Wan 2.1 VAE (4x temporal, 8x spatial)
TEXT_TOKENS, TEXT_DIM = 120, 4096
IMAGE_SHAPE = (257, 1280)
NUM_SAMPLES = 48
SHARD_BYTES = 200e6
READ_TARGET = 0.5  # decoded samples/s / raw samples/s
MB = 1e6
SEED = 1234
CLIPS, CLIP_SECONDS, CLIP_FPS, CLIP_SIZE = 3, 11, 16, (160, 96)  # 176 frames at 16 fps: 2 windows of 81 each


# -- machine load ----------------------------------------------------------------------------------
def _own_cpu_s() -> float:
    """CPU seconds of this process (all threads) and its finished children (ffmpeg)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


class Load:
    """CPUs kept busy by anything but this process between ``start`` and ``stop``."""

    def __init__(self) -> None:
        self.busy, self.own, self.t0 = busy_cpu_s(), _own_cpu_s(), time.perf_counter()

    def other_cpus(self) -> float:
        wall = time.perf_counter() - self.t0
        other = (busy_cpu_s() - self.busy) - (_own_cpu_s() - self.own)
        return round(max(0.0, other) / wall, 2) if wall > 0 else 0.0


# -- part 1: shard reading -------------------------------------------------------------------------
def make_sample(index: int, gen: torch.Generator):
    """One schema-valid sample at real Wan 2.1 480p size, random bf16 values."""
    from svi_infer.schema import SCHEMA_VERSION, Sample

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    key = f"bench-{index:06d}"
    meta = {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "caption": "A colorful test pattern with a moving ball and a running counter.",
        "source": f"videos/bench_{index // 4:04d}.mp4",
        "source_fps": 30.0,
        "fps": 16.0,
        "start_frame": (index % 4) * 81,
        "num_frames": 81,
        "window_index": index % 4,
        "spec": "wan2.1-i2v-14b-480p",
        "height": 480,
        "width": 832,
        "latent_channels": 16,
        "motion_frames": [1],
        "ref_pad_num": -1,
        "text_len": TEXT_TOKENS,
    }
    tensors = {
        "latents": rand(*LATENT_SHAPE),
        "cond.m1": rand(*LATENT_SHAPE),
        "text": rand(TEXT_TOKENS, TEXT_DIM),
        "image": rand(*IMAGE_SHAPE),
    }
    return Sample(key, meta, tensors)


def write_shards(folder: Path, num: int) -> list[str]:
    """``num`` samples into size-capped shards, written as ``run_pack`` does; return the shard paths."""
    import webdataset as wds

    from svi_infer.schema import to_members

    gen = torch.Generator().manual_seed(SEED)
    writer = wds.ShardWriter(str(folder / "shard-%06d.tar"), maxsize=SHARD_BYTES, verbose=0, mtime=0, encoder=False)
    for i in range(num):
        writer.write(to_members(make_sample(i, gen)))
    writer.close()
    return sorted(str(p) for p in folder.glob("shard-*.tar"))


def warm_cache(urls: list[str]) -> int:
    """Read every shard once so all timed passes find it in the page cache; return the total bytes."""
    total = 0
    for url in urls:
        with open(url, "rb") as handle:
            while chunk := handle.read(1 << 24):
                total += len(chunk)
    return total


def read_decoded(urls: list[str]) -> int:
    """(a) The training read path: WebDataset + ``from_members`` (decode and validate) per sample."""
    import webdataset as wds

    from svi_infer.schema import from_members

    count = 0
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        sample = from_members(raw)
        count += len(sample.tensors) > 0
    return count


def read_raw(urls: list[str]) -> int:
    """(b) The same WebDataset iteration, each member's bytes touched but not decoded."""
    import webdataset as wds

    count = 0
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        touched = sum(len(v) for k, v in raw.items() if isinstance(v, bytes | bytearray))
        count += touched > 0
    return count


def _decode_variant(urls: list[str], finite_check) -> int:
    """What-if (diagnosis only): ``from_members`` with its finiteness check replaced by ``finite_check``.

    Metadata, shape and key checks still run (``validate`` on integer stand-ins of the same shapes, which it
    does not check for finiteness); ``finite_check`` is then applied to each float tensor.
    """
    import webdataset as wds
    from safetensors.torch import load as load_safetensors

    from svi_infer.schema import Sample, SchemaError, validate

    count = 0
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(raw["json"])
        tensors = {}
        for name, data in raw.items():
            if name.endswith(".safetensors"):
                tensors.update(load_safetensors(data))
        validate(Sample(raw["__key__"], meta, {k: _int_standin(v) for k, v in tensors.items()}))
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not finite_check(tensor):
                raise SchemaError(f"{name} has non-finite values")
        count += 1
    return count


def _int_standin(tensor: torch.Tensor) -> torch.Tensor:
    """A zero-copy int16 tensor of the same shape: ``validate`` checks its shape but skips ``isfinite``."""
    return torch.zeros(1, dtype=torch.int16).expand(tensor.shape)


def _finite_sum_f64(tensor: torch.Tensor) -> bool:
    """All finite iff the float64 sum is finite (bf16/fp32 values cannot overflow float64 at these counts)."""
    return bool(torch.isfinite(tensor.sum(dtype=torch.float64)))


def read_no_finite_check(urls: list[str]) -> int:
    return _decode_variant(urls, lambda t: True)


def _finite_aminmax(tensor: torch.Tensor) -> bool:
    """All finite iff min and max are: ``aminmax`` propagates NaN and is one fused pass (vs ~5 for ``isfinite``)."""
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def read_aminmax_check(urls: list[str]) -> int:
    return _decode_variant(urls, _finite_aminmax)


def read_tarfile(urls: list[str]) -> int:
    """Reference: plain ``tarfile`` streaming the same members; counts ``.json`` members as samples."""
    count = 0
    for url in urls:
        with tarfile.open(url, "r|") as tar:
            for info in tar:
                if info.isfile():
                    data = tar.extractfile(info).read()
                    count += info.name.endswith(".json") and len(data) > 0
    return count


def time_passes(urls: list[str], repeats: int) -> dict[str, dict]:
    """Best-of-``repeats`` wall time per pass, passes interleaved with the order alternating each round."""
    passes = {
        "decoded": read_decoded,
        "raw": read_raw,
        "tarfile": read_tarfile,
        "no_isfinite": read_no_finite_check,
        "aminmax": read_aminmax_check,
    }
    best: dict[str, float] = {}
    counts: dict[str, int] = {}
    quiet: dict[str, float] = {}  # other load in each pass's least disturbed round
    order = list(passes)
    for rep in range(repeats):
        for name in order if rep % 2 == 0 else order[::-1]:
            load = Load()
            t0 = time.perf_counter()
            counts[name] = passes[name](urls)
            wall = time.perf_counter() - t0
            other = load.other_cpus()
            best[name] = min(best.get(name, wall), wall)
            quiet[name] = min(quiet.get(name, other), other)
            print(f"  round {rep + 1}/{repeats} {name:<11} {wall:7.3f}s  other_load={other:.2f} CPUs")
    return {name: {"samples": counts[name], "seconds": best[name], "other_load": quiet[name]} for name in passes}


def profile_from_members(urls: list[str], limit: int = 16, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per sample of each part of ``from_members`` (best of ``repeats``, on in-memory raw samples)."""
    import webdataset as wds
    from safetensors.torch import load as load_safetensors

    from svi_infer.schema import Sample, from_members, validate

    raws = []
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        raws.append(raw)
        if len(raws) >= limit:
            break
    loaded = [
        {k: v for name, data in r.items() if name.endswith(".safetensors") for k, v in load_safetensors(data).items()}
        for r in raws
    ]
    samples = [Sample(r["__key__"], json.loads(r["json"]), t) for r, t in zip(raws, loaded, strict=True)]

    def no_finite_check(s: Sample) -> None:
        validate(Sample(s.key, s.meta, {k: _int_standin(v) for k, v in s.tensors.items()}))

    parts = {
        "json": lambda i: json.loads(raws[i]["json"]),
        "safetensors_load": lambda i: [load_safetensors(d) for n, d in raws[i].items() if n.endswith(".safetensors")],
        "validate": lambda i: validate(samples[i]),
        "validate_no_isfinite": lambda i: no_finite_check(samples[i]),
        "isfinite_all": lambda i: [torch.isfinite(t).all() for t in samples[i].tensors.values()],
        "from_members": lambda i: from_members(raws[i]),
        # Cheaper equivalents of the finiteness check, for comparison only (schema.py is not changed here).
        "alt_aminmax": lambda i: [_finite_aminmax(t) for t in samples[i].tensors.values()],
        "alt_sum_f64": lambda i: [_finite_sum_f64(t) for t in samples[i].tensors.values()],
        "alt_bf16_bits_amax": lambda i: [  # bf16 only: |bits| >= 0x7F80 is inf or NaN
            int((t.view(torch.int16) & 0x7FFF).amax()) < 0x7F80 for t in samples[i].tensors.values()
        ],
        "memcpy_payload": lambda i: [bytearray(d) for n, d in raws[i].items() if n.endswith(".safetensors")],
    }
    best = dict.fromkeys(parts, float("inf"))
    for _ in range(repeats):  # parts interleaved, so a burst of other load does not hit one part only
        for name, fn in parts.items():
            t0 = time.perf_counter()
            for i in range(len(raws)):
                fn(i)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: 1000.0 * seconds / len(raws) for name, seconds in best.items()}


# -- part 2: encoding ------------------------------------------------------------------------------
def write_clip(path: Path) -> None:
    import imageio_ffmpeg

    w, h = CLIP_SIZE
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y"]
    cmd += ["-f", "lavfi", "-i", f"testsrc2=size={w}x{h}:rate={CLIP_FPS}", "-frames:v", str(CLIP_SECONDS * CLIP_FPS)]
    cmd += ["-c:v", "libx264", "-preset", "veryfast", "-g", "16", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, check=True, capture_output=True)
    path.with_suffix(".txt").write_text("A colorful test pattern with a moving ball and a counter.\n", encoding="utf-8")


def encode_bench(folder: Path, repeats: int = 2) -> dict:
    """scan -> encode -> pack on synthetic clips with the tiny model, ``repeats`` times; the encode stage is the
    timed part, the fastest run is kept."""
    from data_tools.report import Report
    from data_tools.stages import DataSettings, run_encode, run_pack, run_scan
    from svi_infer.model import build_model
    from svi_infer.spec import get_spec

    root = folder / "videos"
    root.mkdir()
    for i in range(CLIPS):
        write_clip(root / f"clip_{i:02d}.mp4")
    settings = DataSettings(frames_per_clip=81, fps=16.0, stride=81, buckets=((48, 80),), motion_frames=(1,))
    t0 = time.perf_counter()
    model = build_model(get_spec("tiny-wan2.1-i2v"))
    build_s = time.perf_counter() - t0

    # Warm-up: one video into its own folder, so one-time costs (first VAE / tokenizer calls) are not timed.
    warm_report = Report()
    warm = run_scan(root, folder / "warm", settings, warm_report)
    warm = {**warm, "videos": [{**warm["videos"][0], "windows": warm["videos"][0]["windows"][:1]}]}
    t0 = time.perf_counter()
    run_encode(warm, folder / "warm", settings, model, warm_report, progress=False)
    warm_s = time.perf_counter() - t0

    runs = []
    for rep in range(repeats):  # each run into a fresh folder, so nothing is skipped as already encoded
        report = Report()
        out = folder / f"data{rep}"
        t0 = time.perf_counter()
        manifest = run_scan(root, out, settings, report)
        scan_s = time.perf_counter() - t0
        load = Load()
        t0 = time.perf_counter()
        run_encode(manifest, out, settings, model, report, progress=False)
        encode_s = time.perf_counter() - t0
        other = load.other_cpus()
        t0 = time.perf_counter()
        index = run_pack(manifest, out, settings, model.spec.id, 1e9)
        pack_s = time.perf_counter() - t0
        windows = index["samples"]
        if windows != sum(len(v["windows"]) for v in manifest["videos"]) or report.skipped:
            raise SystemExit(f"encode produced {windows} samples; skipped: {report.skipped}")
        print(f"  run {rep + 1}/{repeats}: {windows} windows encoded in {encode_s:.2f}s  other_load={other:.2f} CPUs")
        runs.append({"windows": windows, "scan_s": scan_s, "encode_s": encode_s, "pack_s": pack_s, "other_load": other})
    best = min(runs, key=lambda r: r["encode_s"])
    return {
        **best,
        "build_s": build_s,
        "warmup_s": warm_s,
        "warmup_windows": len(warm["videos"][0]["windows"]),
        "quietest_load": min(r["other_load"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=NUM_SAMPLES, help=f"samples in the shards ({NUM_SAMPLES})")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per read method (default 5)")
    args = parser.parse_args()
    t_start = time.perf_counter()
    print(f"torch threads: {torch.get_num_threads()}, CPUs: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "shards").mkdir()
        t0 = time.perf_counter()
        urls = write_shards(tmp_path / "shards", args.samples)
        total = warm_cache(urls)
        per_sample = total / args.samples / MB
        print(
            f"wrote {args.samples} samples ({per_sample:.2f} MB each, {total / MB:.0f} MB) into {len(urls)} shards "
            f"in {time.perf_counter() - t0:.1f}s; page cache warmed"
        )
        results = time_passes(urls, args.repeats)
        for name, r in results.items():
            if r["samples"] != args.samples:
                raise SystemExit(f"{name} pass saw {r['samples']} samples, wrote {args.samples}")
        rates = {n: (r["samples"] / r["seconds"], total / MB / r["seconds"]) for n, r in results.items()}
        head = f"read path (best of {args.repeats})"
        print(f"\n{head:<52}{'samples/s':>10}{'MB/s':>8}{'ms/sample':>11}{'vs (b)':>8}")
        labels = {
            "decoded": "(a) WebDataset + from_members",
            "raw": "(b) WebDataset, bytes only",
            "tarfile": "    tarfile, bytes only (reference)",
            "no_isfinite": "    what-if: (a) without the isfinite check",
            "aminmax": "    what-if: (a) with an aminmax finite check",
        }
        for name, (sps, mbs) in rates.items():
            ratio = sps / rates["raw"][0]
            print(f"{labels[name]:<52}{sps:>10.1f}{mbs:>8.0f}{1000 / sps:>11.2f}{ratio:>8.2f}")

        other = max(r["other_load"] for r in results.values())
        print(f"other load in the least disturbed round of each pass: at most {other:.2f} of {os.cpu_count()} CPUs")
        if other > 0.25:
            print("WARNING: other work competed for the CPUs in every round of some pass; rerun when idle")

        load = Load()
        prof = profile_from_members(urls)
        other = load.other_cpus()
        print(f"\nfrom_members parts, ms per sample (best of 5 over 16 in-memory samples; other_load={other:.2f}):")
        for name, ms in prof.items():
            print(f"  {name:<22}{ms:8.2f}")
        isfinite_share = prof["isfinite_all"] / prof["from_members"]
        print(f"  isfinite share of from_members: {isfinite_share:.0%}")

        print("\nencoding synthetic clips with tiny-wan2.1-i2v ...", flush=True)
        enc = encode_bench(tmp_path)

    read_ratio = rates["decoded"][0] / rates["raw"][0]
    encode_rate = enc["windows"] / enc["encode_s"]
    print(
        f"encode: {enc['windows']} windows ({CLIPS} clips x {CLIP_SECONDS}s, {CLIP_SIZE[0]}x{CLIP_SIZE[1]} -> 48x80) "
        f"in {enc['encode_s']:.2f}s = {encode_rate:.2f} windows/s (fastest of 2 runs); "
        f"model build {enc['build_s']:.1f}s, warm-up {enc['warmup_windows']} windows {enc['warmup_s']:.2f}s, "
        f"scan {enc['scan_s']:.2f}s, pack {enc['pack_s']:.2f}s"
    )
    if enc["quietest_load"] > 0.25:
        print("WARNING: other work competed for the CPUs in every encode run; encode_clips_per_s is low, rerun")
    ok = read_ratio >= READ_TARGET
    verdict = "MET" if ok else "NOT MET"
    print(f"\nread target   decoded/raw samples/s >= {READ_TARGET:.2f}: {read_ratio:.3f} -> {verdict}")
    print(f"(benchmark took {time.perf_counter() - t_start:.0f}s; load average now {os.getloadavg()[0]:.2f})")
    (sps_a, mbs_a), (sps_b, mbs_b), (sps_t, mbs_t) = rates["decoded"], rates["raw"], rates["tarfile"]
    print(
        f"read_ratio={read_ratio:.3f} read_samples_s={sps_a:.1f} read_mb_s={mbs_a:.0f} raw_samples_s={sps_b:.1f} "
        f"raw_mb_s={mbs_b:.0f} tar_samples_s={sps_t:.1f} tar_mb_s={mbs_t:.0f} "
        f"no_isfinite_ratio={rates['no_isfinite'][0] / sps_b:.3f} aminmax_ratio={rates['aminmax'][0] / sps_b:.3f} "
        f"validate_ms={prof['validate']:.1f} isfinite_ms={prof['isfinite_all']:.1f} "
        f"encode_clips_per_s={encode_rate:.2f}"
    )


if __name__ == "__main__":
    main()
