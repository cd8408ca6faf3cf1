"""How long each CLI takes to answer what needs no model: ``--help``, ``--cfg job``, a config mistake, a missing
input. The target is 2 s; the yardstick measured beside them is ``python -c "import torch"``, which none of these
answers may pay for. Also lists what ``python -X importtime`` says each one imported of the heavy libraries
(torch, diffusers, transformers, peft, lightning, deepspeed, webdataset): nothing, if start-up is lazy.

Run: ``.venv/bin/python bench/cli_startup.py [--repeats 5]`` (about half a minute on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_load import busy_cpu_s  # noqa: E402

HEAVY = ("torch", "diffusers", "transformers", "peft", "lightning", "deepspeed", "webdataset")
TARGET_S = 2.0
CASES = {  # name: (module, arguments); a missing input and a config mistake exit non-zero, by design
    "svi_infer_help": ("svi_infer", ["--help"]),
    "svi_infer_cfg_job": ("svi_infer", ["+experiment=shot", "--cfg", "job"]),
    "svi_infer_bad_type": ("svi_infer", ["seed=abc"]),
    "svi_infer_missing_image": ("svi_infer", ["model=tiny_wan21_i2v", "image=/no/such.png", "prompts=a"]),
    "svi_train_help": ("svi_train", ["--help"]),
    "svi_train_cfg_job": ("svi_train", ["+experiment=tiny", "--cfg", "job"]),
    "svi_train_bad_key": ("svi_train", ["+experiment=tiny", "+optim.lrr=1e-4", "data.path=/no/such/dir"]),
    "svi_train_missing_data": ("svi_train", ["+experiment=tiny", "data.path=/no/such/dir"]),
    "export_help": ("svi_train.export", ["--help"]),
    "export_missing_source": ("svi_train.export", ["/no/such.ckpt", "--output", "/tmp/never.safetensors"]),
    "data_tools_help": ("data_tools", ["--help"]),
    "data_tools_cfg_job": ("data_tools", ["--cfg", "job"]),
    "data_tools_bad_type": ("data_tools", ["fps=abc"]),
    "data_tools_missing_input": ("data_tools", ["prepare", "input=/no/such/dir", "output=/tmp/never"]),
    "dwpose_help": ("data_tools.dwpose", ["--help"]),
    "evaluate_help": ("svi_infer.evaluate", ["--help"]),
}


def wall_s(cmd: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, capture_output=True, check=False)
    return time.perf_counter() - start


def heavy_imports(cmd: list[str], cwd: str) -> list[str]:
    """The heavy top-level packages ``python -X importtime`` reports for ``cmd``."""
    done = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=cwd, capture_output=True, text=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return sorted(name for name in names if name in HEAVY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command; the median is kept")
    args = parser.parse_args()
    cwd = tempfile.mkdtemp()  # outside the checkout: a ./conf folder there would shadow the installed configs
    torch_cmd = [sys.executable, "-c", "import torch"]
    cases = {name: [sys.executable, "-m", module, *argv] for name, (module, argv) in CASES.items()}
    busy_before, clock = busy_cpu_s(), time.perf_counter()
    times: dict[str, list[float]] = {name: [] for name in ["import_torch", *cases]}
    for _ in range(args.repeats):  # interleaved, so a burst of other load hits every command alike
        times["import_torch"].append(wall_s(torch_cmd, cwd))
        for name, cmd in cases.items():
            times[name].append(wall_s(cmd, cwd))
    elapsed = time.perf_counter() - clock
    busy = (busy_cpu_s() - busy_before) / elapsed if elapsed else 0.0
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{'command':28s} {'median s':>9s} {'x import torch':>15s}  heavy imports")
    for name, cmd in cases.items():
        heavy = heavy_imports(cmd, cwd)
        ratio = median[name] / median["import_torch"]
        print(f"{name:28s} {median[name]:9.2f} {ratio:15.2f}  {', '.join(heavy) or 'none'}")
    yardstick = 'python -c "import torch"'
    print(f"{yardstick:28s} {median['import_torch']:9.2f} {1.0:15.2f}")
    worst = max(cases, key=median.get)
    verdict = "MET" if median[worst] <= TARGET_S else "NOT MET"
    print(f"slowest: {worst} {median[worst]:.2f} s; target {TARGET_S:.0f} s: {verdict}")
    print(f"machine busy (all cores) while measuring: {busy:.2f} cores")
    figures = " ".join(f"{name}_s={median[name]:.2f}" for name in cases)
    print(f"{figures} import_torch_s={median['import_torch']:.2f} worst_s={median[worst]:.2f} busy_cores={busy:.2f}")


if __name__ == "__main__":
    main()
