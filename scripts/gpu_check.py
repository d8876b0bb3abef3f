"""The device check of issue 22: what one lent GPU measures, written to one JSON file part by part.

    bash scripts/gpu_check.sh [--dry-run] [--out FILE] [--budget SECONDS]   (the shell script picks the python)

Parts, in this order (cheap measurements first, the long test run last, so a short lease still gets numbers):
  env        interpreter, torch/CUDA build and device, our dependencies' versions against pyproject's pins
  train      bf16 RL steps (rredcot train, the default algorithm) of a random-init Qwen2 through the CLI;
             `stages` is its per-stage step time (metrics.jsonl's time/*_s, the first step left out: warm-up)
  probes     the probe pass (probes.score_items, what training calls) on one random trace of 4k/16k/32k tokens
  sampler    tokens/s of rollout=sample (KVCacheBackend, keyed seeds) against transformers' model.generate
  gpu_tests  pytest -m gpu (tests/integration/test_gpu*.py; conftest skips them where CUDA is absent)
On the GPU each part runs in a child process of its own with its own timeout (at most what is left of
--budget, 420 s: the device tool's 8-minute target less the script's set-up), and the file is rewritten after
every part, so a hang or a CUDA crash costs that part only. `--dry-run`: every part on CPU at toy sizes, in one
shared child (`--isolate`: one each), with the same keys; CI runs it (tests/integration/test_gpu_check.py).
Sizes on the GPU: Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads), its vocabulary (151,936)
for probes and sampler; the trained model has the ChatML test tokenizer's (tests/integration/test_model_presets.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # rredcot and tests/ from this checkout, whatever the interpreter has installed
PARTS = ("env", "train", "probes", "sampler", "gpu_tests")
CAPS = {"env": 60, "train": 150, "probes": 90, "sampler": 90, "gpu_tests": 240}  # seconds, on the GPU
SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
SHAPE.update(num_key_value_heads=2)  # Qwen2.5-0.5B's shape, vocabulary apart
TOY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
PROBE_LENGTHS = {"4k": 4096, "16k": 16384, "32k": 32768}
DEPS = ("torch", "transformers", "tokenizers", "accelerate", "peft", "datasets", "hydra-core", "omegaconf", "typer")
DEPS += ("rich", "math-verify", "safetensors", "pytest")


def _model(vocab: int, dry: bool, max_pos: int):
    """A random-init Qwen2 of SHAPE (TOY in a dry run), bf16 on the GPU / fp32 on CPU, in eval mode."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab, max_position_embeddings=max_pos, tie_word_embeddings=True, **(TOY if dry else SHAPE)
    )
    torch.manual_seed(0)
    dev, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    model.generation_config.eos_token_id = None  # no stop token: every row samples its whole budget
    return model.eval()


def _peak(reset: bool = False) -> tuple[float, str]:
    """(peak MiB, what it measures): torch.cuda.max_memory_allocated, or this process's peak RSS on CPU."""
    import torch

    if torch.cuda.is_available():
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def part_env(dry: bool) -> dict:
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__}
    out.update(torch_cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if out["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
    elif torch.version.cuda is None:
        out["cuda_note"] = (
            f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): nothing here can use a "
            "GPU. On the device machine run with the image's python3, whose torch has CUDA: "
            "PYTHON=python3 bash scripts/gpu_check.sh (the script does this itself when python3's torch sees one)."
        )
    else:
        out["cuda_note"] = f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU."
    versions = {}
    for name in DEPS:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    out["versions"] = versions
    modules = {"hydra-core": "hydra", "omegaconf": "omegaconf", "math-verify": "math_verify", "datasets": "datasets"}
    modules.update(typer="typer", rich="rich", accelerate="accelerate")
    out["missing"] = [n for n, m in modules.items() if importlib.util.find_spec(m) is None]
    out["outside_pins"] = _outside_pins(versions)
    return out


def _outside_pins(versions: dict) -> list[str]:
    """Installed releases that pyproject.toml's requirements do not admit (a device image's are not ours)."""
    try:
        import tomllib
        from packaging.requirements import Requirement
    except ImportError:  # Python 3.10 has no tomllib; the check is a courtesy
        return []
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["peft"]]
    return [
        f"{r.name} {versions[r.name]} (pyproject: {r})"
        for r in reqs
        if versions.get(r.name) and not r.specifier.contains(versions[r.name].split("+")[0], prereleases=True)
    ]


def _model_dir(root: Path, dry: bool) -> tuple[Path, int]:
    """A local model folder as tests/integration/test_gpu.py uses: ChatML BPE tokenizer, random Qwen2."""
    from tests.integration.test_model_presets import CHATML, SPECIAL, _tokenizer

    tok = _tokenizer(CHATML, "chatml", "<|im_end|>")
    model = _model(len(tok), dry, 4096)
    model.generation_config.eos_token_id = sorted({tok.convert_tokens_to_ids(t) for t in SPECIAL["chatml"][::2]})
    model.config.eos_token_id, model.config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", sum(p.numel() for p in model.parameters())


def part_train(dry: bool, timeout: float, logs: Path) -> dict:
    assets = REPO / "tests" / "assets"
    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    model_dir, params = _model_dir(root, dry)
    steps, batch, tokens, micro = (2, 8, 16, 8) if dry else (5, 64, 256, 32)
    cmd = [sys.executable, "-m", "rredcot", "train", "debug=fast", "task=gsm8k", "model=qwen2.5-1.5b-instruct"]
    cmd += [f"model.name={model_dir}", "warmstart.enabled=false", f"device={'cpu' if dry else 'cuda'}"]
    cmd += [f"task.sources.train.path={assets / 'gsm8k_train.jsonl'}", "task.dev_size=4"]
    cmd += [f"task.sources.test.path={assets / 'gsm8k_test.jsonl'}", f"rollout.max_new_tokens={tokens}"]
    cmd += [f"train.steps={steps}", f"train.generation_batch_size={batch}", f"update.micro_batch_size={micro}"]
    cmd += ["train.log_every=1", "train.eval_every=0", "train.save_every=0", "eval.n_prompts=4"]
    cmd += [f"run_dir={root / 'run'}", "logging.progress=false"]
    code = _run_group(cmd, timeout - 5, logs / "train.log")
    out = {"model": {"arch": "qwen2", "dtype": "float32" if dry else "bfloat16", "parameters": params}}
    out.update(steps_asked=steps, generation_batch_size=batch, max_new_tokens=tokens, exit_code=code)
    metrics = root / "run" / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    rows = [r for r in rows if "time/step_s" in r]
    out["steps"] = len(rows)
    if rows:
        timed = rows[1:] or rows  # the first step pays for CUDA's and the kernels' warm-up
        keys = sorted(k for k in rows[0] if k.startswith("time/"))
        out["stages"] = {k[5:]: sum(r[k] for r in timed) / len(timed) for k in keys}
        out["first_step_s"] = rows[0]["time/step_s"]
        out["tokens_per_s"] = sum(r["tokens/s"] for r in timed) / len(timed)
        out["peak_memory_mb"] = max(r["memory/peak_mb"] for r in rows)
    if code != 0 or not rows:
        out["status"] = "failed"
        out["tail"] = (logs / "train.log").read_text()[-2000:]
    shutil.rmtree(root, ignore_errors=True)  # the model and the run: what counts is in the JSON now
    return out


def part_probes(dry: bool) -> dict:
    import torch

    from rredcot.stages.probes import ProbeItem, score_items

    scale = 64 if dry else 1
    vocab = 1000 if dry else 151936  # Qwen2.5's vocabulary: the LM head is the probe pass's largest matrix
    model = _model(vocab, dry, max(PROBE_LENGTHS.values()) // scale + 512)
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(1)
    K, A = (2, 2) if dry else (8, 3)  # boundaries, answers: the cached path runs K * A short forwards
    out = {"boundaries": K, "answers": A, "answer_tokens": 8, "forcing_tokens": 8, "vocab": vocab}
    # training's default (score_items' packed_max_tokens): 4k goes packed, 16k and 32k through the KV cache
    packed_max = 8192 if not dry else 8192 // scale + 2 * 2 * 16
    for i, (name, full) in enumerate(PROBE_LENGTHS.items()):
        L = full // scale
        trace = torch.randint(10, vocab - 10, (L,), generator=g)
        bounds = [int(L * (k + 1) / K) for k in range(K)]
        force = torch.randint(10, vocab - 10, (8,), generator=g)
        answers = [torch.randint(10, vocab - 10, (8,), generator=g) for _ in range(A)]
        item = ProbeItem.from_parts(trace, bounds, force, answers)
        if i == 0 and not dry:  # warm-up: kernels and allocator
            list(score_items(model, [item], packed_max_tokens=packed_max))
        _sync()
        _peak(reset=True)
        t = time.perf_counter()
        scores = list(score_items(model, [item], packed_max_tokens=packed_max))[0]
        _sync()
        seconds = time.perf_counter() - t
        peak, kind = _peak()
        path = "packed" if item.packed_tokens <= packed_max else "cached"
        out[name] = {
            "tokens": L,
            "path": path,
            "seconds": seconds,
            "peak_memory_mb": peak,
            "finite": bool(torch.isfinite(scores).all()),
        }
        out["memory_kind"] = kind
        del scores
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out["peak_memory_mb"] = max(out[n]["peak_memory_mb"] for n in PROBE_LENGTHS)
    return out


def part_sampler(dry: bool) -> dict:
    from types import SimpleNamespace

    import torch

    from rredcot.stages.rollout import KVCacheBackend, Sampling

    rows, prompt, new, vocab = (4, 8, 8, 1000) if dry else (64, 128, 256, 151936)
    model = _model(vocab, dry, prompt + new + 8)
    dev = next(model.parameters()).device
    ids = torch.randint(10, vocab - 10, (rows, prompt), generator=torch.Generator().manual_seed(2)).to(dev)
    mask = torch.ones_like(ids)
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=vocab)  # an id never drawn: every row runs `new` tokens
    backend = KVCacheBackend(model, tok, chunk_size=rows)

    def ours(n):
        return backend.generate(ids, mask, Sampling(max_new_tokens=n), seeds=list(range(rows))).ids

    def theirs(n):
        kw = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0)
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, **kw)[:, prompt:]

    out = {"rows": rows, "prompt_tokens": prompt, "new_tokens": new, "vocab": vocab}
    _peak(reset=True)
    for name, fn in (("rollout_sample", ours), ("hf_generate", theirs)):
        with torch.no_grad():
            fn(1 if dry else 4)  # warm-up
            _sync()
            t = time.perf_counter()
            got = fn(new)
            _sync()
        seconds = time.perf_counter() - t
        out[f"{name}_tokens_per_s"] = got.numel() / seconds
        out[f"{name}_s"] = seconds
        out[f"{name}_tokens"] = got.numel()
    out["ratio"] = out["rollout_sample_tokens_per_s"] / out["hf_generate_tokens_per_s"]
    out["peak_memory_mb"], out["memory_kind"] = _peak()
    return out


def part_gpu_tests(dry: bool, timeout: float, logs: Path) -> dict:
    files = ["tests/integration/test_gpu.py", "tests/integration/test_gpu_distributed.py"]
    # a fresh basetemp: run from inside a test session (CI's dry run), pytest would prune that session's own
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-p", "no:xdist", *files]
    basetemp = tempfile.mkdtemp(prefix="gpu_check_pytest_")
    cmd += ["--basetemp", basetemp]
    code = _run_group(cmd, timeout - 5, logs / "gpu_tests.log")
    shutil.rmtree(basetemp, ignore_errors=True)
    text = (logs / "gpu_tests.log").read_text()
    # pytest's last line ("== 2 passed, 1 skipped in 80.1s =="); cut off by a timeout: the -v lines so far
    final = [ln for ln in text.splitlines() if re.match(r"=+ .* in [\d.]+s", ln)]
    found = (
        dict((w, int(n)) for n, w in re.findall(r"(\d+) (passed|failed|skipped|error)", final[-1]))
        if final
        else {w: len(re.findall(rf"::\S+ {w.upper()}", text)) for w in ("passed", "failed", "skipped", "error")}
    )
    counts = {w: found.get(w, 0) for w in ("passed", "failed", "skipped", "error")}
    out = {"exit_code": code, **counts, "tail": text[-1500:]}
    if code != 0 or counts["failed"] or counts["error"]:
        out["status"] = "timeout" if code is None else "failed"
    return out


def _run_group(cmd: list[str], timeout: float, log: Path) -> int | None:
    """Run `cmd` in its own process group, output to `log`; kill the whole group at `timeout` (None then)."""
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def _child(parts: list[str], dry: bool, timeout: float, logs: Path, result: Path) -> None:
    """Run `parts` in order in this process, rewriting `result` ({part: its JSON}) after each one."""
    done, caps = {}, _caps(dry)
    for part in parts:
        t = time.perf_counter()
        fn = globals()[f"part_{part}"]
        try:
            out = fn(dry, min(caps[part], timeout), logs) if part in ("train", "gpu_tests") else fn(dry)
        except Exception:  # in a shared child (the dry run) one part's crash must not cost the others
            import traceback

            out = {"status": "error", "tail": traceback.format_exc()[-2000:]}
        out.setdefault("status", "ok")
        out["seconds"] = time.perf_counter() - t
        done[part] = out
        result.write_text(json.dumps(done))


def _caps(dry: bool) -> dict[str, float]:
    return {p: c / 3 for p, c in CAPS.items()} if dry else dict(CAPS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every part on CPU at toy sizes (CI)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "runs")) / "gpu_check.json")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all parts together")
    ap.add_argument("--isolate", action="store_true", help="one child per part in a dry run too (the GPU's way)")
    ap.add_argument("--parts", help=argparse.SUPPRESS)  # a child: these parts (comma-separated)
    ap.add_argument("--timeout", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logs = args.out.parent
    if args.parts:
        _child(args.parts.split(","), args.dry_run, args.timeout, logs, args.result)
        return 0
    logs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    report = {"dry_run": args.dry_run, "status": "running", "budget_s": args.budget, "started": time.ctime()}
    caps = _caps(args.dry_run)

    def write():
        report["seconds"] = time.monotonic() - start
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.out)  # a reader never sees half a file

    # On the GPU one child per part: a hang or a CUDA crash costs that part alone. The dry run shares one
    # child: each child imports transformers (5 CPU-seconds here), and CI's 2 cores pay for every import.
    for group in [PARTS] if args.dry_run and not args.isolate else [(p,) for p in PARTS]:
        todo = []
        for part in group:
            left = args.budget - (time.monotonic() - start)
            if left < 10:
                report[part] = {"status": "skipped", "reason": f"the budget of {args.budget:.0f} s was spent"}
            elif part != "env" and not args.dry_run and not report["env"].get("cuda_available"):
                report[part] = {"status": "skipped", "reason": "no CUDA: " + report["env"].get("cuda_note", "")}
            else:
                todo.append(part)
        if todo:
            report.update(_spawn(todo, args, min(sum(caps[p] for p in todo), left), logs))
        if "env" in report and "cuda" not in report:
            report["cuda"] = bool(report["env"].get("cuda_available"))  # false: env.cuda_note says why
        if "train" in report and "stages" not in report:
            report["stages"] = report["train"].pop("stages", {})
        write()
    parts = [p for p in PARTS if isinstance(report[p].get("peak_memory_mb"), (int, float))]
    report["peak_memory_mb"] = {p: report[p]["peak_memory_mb"] for p in parts}
    report["status"] = "done" if all(report[p]["status"] == "ok" for p in PARTS) else "incomplete"
    write()
    print(json.dumps({p: report[p]["status"] for p in PARTS}), "->", args.out)
    return 0 if report["status"] == "done" else 1


def _spawn(parts: list[str], args, timeout: float, logs: Path) -> dict:
    """`parts` in a child process (killed with its group at `timeout`): their JSON, or what went wrong."""
    name = "_".join(parts) if len(parts) == 1 else "all"
    result, log = logs / f".gpu_check_{name}.json", logs / f".gpu_check_{name}.log"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--parts", ",".join(parts), "--timeout", str(timeout), "--result", str(result)]
    cmd += ["--out", str(args.out)] + (["--dry-run"] if args.dry_run else [])
    t = time.monotonic()
    code = _run_group(cmd, timeout, log)
    done = json.loads(result.read_text()) if result.exists() else {}
    result.unlink(missing_ok=True)
    if len(done) == len(parts):
        log.unlink()  # kept only when a part died: the device returns 8 files at most
        return done
    tail = log.read_text()[-2000:]
    status = "timeout" if code is None else "error"
    lost = {"status": status, "seconds": time.monotonic() - t, "limit_s": timeout, "exit_code": code, "tail": tail}
    return {**done, **{p: dict(lost) for p in parts if p not in done}}


if __name__ == "__main__":
    sys.exit(main())
