"""Bit-for-bit proof for refactors (issue 16): prune SmolLM2-135M three ways with small, fixed
calibration settings and hash every file of each checkpoint.

    python benchmarks/checkpoint_hashes.py --out /tmp/hashes            # print the hashes
    python benchmarks/checkpoint_hashes.py --write benchmarks/checkpoint_hashes.json
    python benchmarks/checkpoint_hashes.py --check benchmarks/checkpoint_hashes.json

The three checkpoints: HARP P = 8 (searched alphas), Gate-Norm 8 and FLAP at 72 of 270 heads
(``--ratio 0.2667``, global allocation). ``--check`` exits 1 when any hash differs. The hashes
hold for one machine and one torch build (they are a before/after proof, not a portable one).
config.json is hashed without its wall-clock entries (keys ending in ``seconds``, e.g. the
alpha search's ``search_seconds``); every other byte of every file counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

SMALL = ["--eval-windows", "0", "--force", "--threads", "2"]
RUNS: dict[str, list[str]] = {
    "harp-top8": ["--layers", "8", "--calib-samples", "4", "--calib-seq-len", "128"],
    "gate-norm8": ["--method", "gate-norm", "--layers", "8", "--calib-samples", "4",
                   "--calib-seq-len", "128"],
    "flap-72heads": ["--method", "flap", "--ratio", "0.2667", "--allocation", "global",
                     "--calib-samples", "16", "--calib-seq-len", "128"],
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _drop_timings(value):
    if isinstance(value, dict):
        return {k: _drop_timings(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [_drop_timings(v) for v in value]
    return value


def file_hash(path: Path) -> str:
    if path.name != "config.json":
        return sha256(path)
    text = json.dumps(_drop_timings(json.loads(path.read_text())), indent=2, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def build(out: Path) -> dict[str, dict[str, str]]:
    cli = Path(sys.executable).with_name("harp-vllm")
    hashes: dict[str, dict[str, str]] = {}
    for name, args in RUNS.items():
        target = out / name
        cmd = [str(cli), "prune", "smollm2-135m", "--out", str(target), *args, *SMALL]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        hashes[name] = {p.name: file_hash(p) for p in sorted(target.iterdir()) if p.is_file()}
    return hashes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/harp-checkpoint-hashes"))
    ap.add_argument("--write", type=Path, help="save the hashes as JSON")
    ap.add_argument("--check", type=Path, help="compare with saved hashes; exit 1 on a mismatch")
    a = ap.parse_args()
    hashes = build(a.out)
    print(json.dumps(hashes, indent=2))
    if a.write:
        a.write.write_text(json.dumps(hashes, indent=2) + "\n")
    if a.check:
        want = json.loads(a.check.read_text())
        if want != hashes:
            for name in sorted(set(want) | set(hashes)):
                w, g = want.get(name, {}), hashes.get(name, {})
                for f in sorted(set(w) | set(g)):
                    if w.get(f) != g.get(f):
                        print(f"MISMATCH {name}/{f}: {w.get(f)} != {g.get(f)}")
            return 1
        print(f"OK: {sum(len(v) for v in hashes.values())} files match {a.check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
