"""Fuzz the server's HTTP API from its own description (`/openapi.json`) with schemathesis, all checks.

Starts `rahf serve` on loopback over the tiny random test model (4 layers of 64, a character tokenizer,
context 2048) with two profiles and API/admin keys, runs `st run --checks all` against it for a time
budget (examples, coverage, fuzzing and stateful phases; fuzzing and stateful sequences repeat until the
budget is spent), then stops the server with SIGTERM. Exits non-zero on any schemathesis finding, on a
server log line at level error (an unhandled exception) or on an unclean stop.

    python bench/fuzz.py --max-time 180          # what CI runs (.ci/run)
    python bench/fuzz.py --default-config        # as a new user runs it: no project configuration
    bash bench/fuzz.sh                           # the long run (30 minutes by default)

`--default-config` runs schemathesis as someone who has only the server would: no bench/schemathesis.toml
(its per-operation expected statuses), no bench/fuzz_hooks.py (its real profile files for valid uploads),
every check on in its default configuration; only the keys (`--header`) and the run's size are given.
The description alone has to make every schema-valid request one the server accepts; the rules it cannot
state (an upload's bytes must be a profile file; a chat `response_format` schema must be one llguidance
compiles) remain as findings there (docs/reliability.md, "As a new user runs it").

Needs the `test` extra (schemathesis). Reports (JUnit XML, NDJSON events) go to --report-dir.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server.procs import ServeProcess, tiny_model, write_profiles  # noqa: E402

API_KEY = "fuzz-user-key"
ADMIN_KEY = "fuzz-admin-key"
# small limits keep each generated request cheap; the description carries them (max_tokens, n, ...)
SERVER_FLAGS = ["--max-tokens-limit", "32", "--default-max-tokens", "8", "--max-batch-size", "8",
                "--max-queue", "64", "--shutdown-timeout", "20", "--max-profile-bytes", "262144"]


def write_uploads(model_dir: Path, folder: Path) -> Path:
    """Valid upload bodies for bench/fuzz_hooks.py: profiles with other layers and strengths, one with a
    low-rank term, and a GGUF control vector. All use position mode `all`, as the served profiles do (a
    request mixing modes without choosing one is a 400 the description cannot express)."""
    import torch

    from steering_vectors.core.gguf_io import write_control_vector
    from steering_vectors.core.models import load_model
    from steering_vectors.core.profile import Profile

    fingerprint = load_model(model_dir).fingerprint
    hidden = fingerprint.hidden_size
    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    variants = [((1,), 1.0, False), ((0, 3), 0.5, False), ((1, 2, 3), 2.0, False), ((2,), 1.0, True)]
    for i, (layers, strength, low_rank) in enumerate(variants):
        offsets = {layer: torch.randn(hidden, generator=generator) for layer in layers}
        terms = {}
        if low_rank:
            terms = {layers[0]: (torch.randn(2, hidden, generator=generator) * 0.1,
                                 torch.randn(hidden, 2, generator=generator) * 0.1)}
        profile = Profile(name=f"upload{i}", offsets=offsets, fingerprint=fingerprint, default_strength=strength,
                          low_rank=terms, description=f"fuzz upload {i}")
        (folder / f"upload{i}.safetensors").write_bytes(profile.to_bytes())
    vector = Profile(name="vector", offsets={1: torch.randn(hidden, generator=generator)}, fingerprint=fingerprint)
    (folder / "vector.gguf").write_bytes(write_control_vector(vector))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", type=int, default=180, help="schemathesis time budget in seconds")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--report-dir", type=Path, default=ROOT / ".cache" / "fuzz")
    parser.add_argument("--nice", type=int, default=0, help="run the server under nice -n N")
    parser.add_argument("--keep", action="store_true", help="keep the temporary model and profile folders")
    parser.add_argument("--default-config", action="store_true",
                        help="no project configuration file and no hooks: schemathesis's defaults, all checks")
    parser.add_argument("--max-examples", type=int, default=None, help="schemathesis examples per operation")
    args = parser.parse_args()
    args.report_dir = args.report_dir.resolve()

    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        print("fuzz: schemathesis is not installed (pip install -e '.[test]')", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="rahf-fuzz-"))
    args.report_dir.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work / "model", context=2048)
    profiles = write_profiles(model, work / "profiles", {"alpha": {}, "beta": {"default_strength": 0.5}})
    uploads = write_uploads(model, work / "uploads")
    keys = work / "keys.txt"
    keys.write_text(f"{API_KEY}\nadmin:{ADMIN_KEY}\n")
    log = args.report_dir / "server.log"
    log.unlink(missing_ok=True)
    server = ServeProcess(model, log, "--profile-dir", str(profiles), "--keys-file", str(keys), *SERVER_FLAGS,
                          nice=args.nice)
    server.start()
    started = time.monotonic()
    try:
        config = [] if args.default_config else ["--config-file", str(ROOT / "bench" / "schemathesis.toml")]
        command = [
            st, *config, "run", f"{server.url}/openapi.json",
            "--checks", "all",
            "--max-time", str(args.max_time),
            "--seed", str(args.seed),
            "--workers", "1",
            "--request-timeout", "60",
            "--header", f"Authorization: Bearer {ADMIN_KEY}",
            "--report", "junit,ndjson",
            "--report-dir", str(args.report_dir),
            "--no-color",
        ]
        if args.max_examples is not None:
            command += ["--max-examples", str(args.max_examples)]
        print("fuzz:", " ".join(c.replace(ADMIN_KEY, "***") for c in command), flush=True)
        hooks = {"SCHEMATHESIS_HOOKS": str(ROOT / "bench" / "fuzz_hooks.py"), "RAHF_FUZZ_UPLOADS": str(uploads)}
        env = {key: value for key, value in os.environ.items() if not key.startswith("SCHEMATHESIS_")}
        # cwd: schemathesis keeps its replay store (.schemathesis/) in the working directory (and would read a
        # schemathesis.toml there: the report folder has none)
        fuzz = subprocess.run(command, cwd=args.report_dir, env=env if args.default_config else {**env, **hooks})
    finally:
        code = server.stop(signal.SIGTERM, timeout=60)
    took = time.monotonic() - started
    errors = [r for r in server.log_records() if r.get("level") in ("error", "critical")]
    for record in errors[:10]:
        print("fuzz: server error:", record.get("msg"), record.get("exc", "")[-2000:], file=sys.stderr)
    clean_stop = code in (0, -signal.SIGTERM)
    print(f"fuzz: schemathesis exit {fuzz.returncode}, {len(errors)} server errors logged, server exit {code}, "
          f"{took:.0f}s; reports in {args.report_dir}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if fuzz.returncode == 0 and not errors and clean_stop else 1


if __name__ == "__main__":
    raise SystemExit(main())
