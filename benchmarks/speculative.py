"""Self-speculative decoding from a distilled LM exit (``bx.generate``) against plain greedy and HF's early exit.

No pretrained LM can be downloaded here, so the script trains one: a byte-level decoder (vocabulary 256) on the
Python standard library's own ``.py`` sources (every file of ``sysconfig.get_paths()["stdlib"]``, sorted; every
tenth file is held out). The model is GPT-2 sized (8 layers, width 256, 4 heads, a SwiGLU MLP of 8/3 x width, which
holds what GPT-2's 4 x width MLP holds) but built as ``LlamaForCausalLM`` (pre-norm blocks with RoPE and RMSNorm):
HF's ``generate(assistant_early_exit=k)`` honours ``config.num_hidden_layers`` only in Llama-style decoders
(GPT-2's loop runs every block whatever the config says), so this is the architecture on which the anchor means
something. Training: ``--train-steps`` (default 400) AdamW steps on 8 random windows of 128 bytes, warm-up and
cosine decay; then an LM exit after layer 2 (1/4 of the depth) distilled with ``bx.fit(mode="distill")`` for
``--distill-steps`` (default 80) batches of 16. Both are kept under ``--cache`` (default ``~/.cache/branchify``),
keyed by the setting, so a rerun only measures.

Then, on prompts of 64 bytes cut from the held-out files, in one run, interleaved
(``branchify.runtime.benchmark.interleaved``; the median of the repeats), each variant generating
``--new`` tokens greedily:

- ``greedy``: ``model.generate(do_sample=False)``, batch 1 (prompt by prompt) and batch 8;
- ``bx``: ``bx.generate(module, ..., draft_tokens=d)``, batch 1 and batch 8;
- ``hf-early-exit``: ``model.generate(assistant_early_exit=k, do_sample=False)`` at batch 1 (HF's assisted
  generation takes batch 1 only), with the raw final norm and ``lm_head`` on layer k (no adapter: HF has none).

Reported: tokens/s of each, speedups over greedy, the acceptance rate and tokens per verification step of
``bx.generate``, two ceilings on its speedup (all time per layer call, or all time per token through a layer), and
the identical-output check on every prompt (float32: a mismatch would be a tie within rounding; it is counted, not
hidden). Load matters: ``uptime`` is printed before and after.

    python benchmarks/speculative.py                 # full: 8 layers x 256; about 15 + 1 minutes of training
    python benchmarks/speculative.py --quick         # reduced: 4 layers x 128, 30 + 10 steps, 4 prompts
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import statistics
import subprocess
import sysconfig
import time

import torch
import transformers

import branchify as bx
from branchify.lm import distill_agreement
from branchify.runtime.benchmark import interleaved


def corpus() -> tuple[bytes, bytes]:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    train, held = [], []
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            (held if i % 10 == 9 else train).append(f.read())
    return b"\n".join(train), b"\n".join(held)


def chunks(data: bytes, length: int, generator: torch.Generator, count: int) -> torch.Tensor:
    starts = torch.randint(0, len(data) - length - 1, (count,), generator=generator)
    return torch.stack([torch.frombuffer(bytearray(data[s:s + length]), dtype=torch.uint8).long() for s in starts])


def train_lm(model, data: bytes, steps: int, batch: int, length: int, lr: float) -> tuple[float, float]:
    """``steps`` AdamW steps on random windows of ``data``, linear warm-up then cosine decay; (last loss, seconds)."""
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    start, loss = time.perf_counter(), float("nan")
    for step in range(steps):
        ids = chunks(data, length, generator, batch)
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        loss = float(out.loss.detach())
        if step % 25 == 0:
            print(f"  step {step}/{steps}: loss {loss:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    return loss, time.perf_counter() - start


def held_out_loss(model, data: bytes, length: int) -> float:
    ids = chunks(data, length, torch.Generator().manual_seed(1), 16)
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def build(layers: int, width: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    # GPT-2 sized (4 heads; a SwiGLU MLP of 8/3 x width holds what GPT-2's 4 x width MLP holds)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=width, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=4,
                                      intermediate_size=-(-8 * width // 3 // 64) * 64, max_position_embeddings=512,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=0, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def trained(args, layers: int, width: int, exit_layer: int, train: bytes, held: bytes):
    """The trained model and its distilled exit, from ``--cache`` when this setting was trained before."""
    key = f"L{layers}-w{width}-t{args.train_steps}-x{exit_layer}-d{args.distill_steps}"
    path = os.path.join(os.path.expanduser(args.cache), f"speculative-{key}.pt")
    model = build(layers, width)
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer=f"model.layers.{exit_layer - 1}", head=bx.HeadSpec(kind="lm"))])
    module = bx.attach_exits(model, spec)
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["model"])
        module.exit_heads.load_state_dict(saved["heads"])
        model.eval()
        print(f"loaded from {path} (trained {saved['log']['when']})")
        for line in saved["log"]["lines"]:
            print(line)
        return model, module
    lines = []
    loss, seconds = train_lm(model, train, args.train_steps, batch=8, length=128, lr=3e-3)
    lines.append(f"model: {layers} layers x {width}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
                 f"parameters; {args.train_steps} steps of 8 x 128 bytes in {seconds:.0f} s, train loss {loss:.3f}, "
                 f"held-out loss {held_out_loss(model, held, 128):.3f} nats/byte")
    print(lines[-1])
    val = torch.utils.data.DataLoader(chunks(held, 128, torch.Generator().manual_seed(3), 32), batch_size=8)
    before = distill_agreement(module, val, torch.device("cpu"))[0]
    texts = chunks(train, 128, torch.Generator().manual_seed(2), 16 * args.distill_steps)
    start = time.perf_counter()
    bx.fit(module, torch.utils.data.DataLoader(texts, batch_size=16), epochs=1, mode="distill", lr=3e-3,
           progress=False)
    seconds = time.perf_counter() - start
    agreement = distill_agreement(module, val, torch.device("cpu"))[0]
    lines.append(f"exit after layer {exit_layer} of {layers}: held-out greedy agreement with the model {before:.1%} "
                 f"undistilled (HF's early exit), {agreement:.1%} distilled ({args.distill_steps} steps, "
                 f"{seconds:.0f} s)")
    print(lines[-1])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": model.state_dict(), "heads": module.exit_heads.state_dict(),
                "log": {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "lines": lines}}, path)
    print(f"saved to {path}")
    return model, module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers x 128, 30 + 10 steps of training, 4 prompts")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--exit-layer", type=int, help="decoder layers below the exit (default: a quarter)")
    parser.add_argument("--train-steps", type=int)
    parser.add_argument("--distill-steps", type=int)
    parser.add_argument("--cache", default="~/.cache/branchify", help="where trained models are kept for reruns")
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--draft-tokens", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    layers = args.layers or (4 if args.quick else 8)
    width = args.width or (128 if args.quick else 256)
    exit_layer = args.exit_layer or max(1, layers // 4)
    args.train_steps = args.train_steps or (30 if args.quick else 400)
    args.distill_steps = args.distill_steps or (10 if args.quick else 80)
    n_prompts = args.prompts or (4 if args.quick else 8)
    torch.set_num_threads(args.threads)
    print(f"load before: {uptime()}")
    train, held = corpus()
    print(f"corpus: {len(train) / 1e6:.2f} MB of stdlib source for training, {len(held) / 1e6:.2f} MB held out")
    model, module = trained(args, layers, width, exit_layer, train, held)

    prompts = chunks(held, 64, torch.Generator().manual_seed(4), n_prompts)
    new, d = args.new, args.draft_tokens

    def greedy(ids):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              pad_token_id=0)

    def ours(ids):
        return bx.generate(module, ids, max_new_tokens=new, draft_tokens=d)

    def hf_early(ids):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              assistant_early_exit=exit_layer, pad_token_id=0)

    with torch.inference_mode():
        reference = [greedy(p[None]) for p in prompts]
        results = [ours(p[None]) for p in prompts]
        batched = ours(prompts)
        anchor = [hf_early(p[None]) for p in prompts]
    same1 = sum(torch.equal(r.sequences, e) for r, e in zip(results, reference))
    same8 = sum(torch.equal(batched.sequences[i:i + 1], e) for i, e in enumerate(reference))
    same_hf = sum(torch.equal(a, e) for a, e in zip(anchor, reference))
    accepted = sum(r.kept for r in results) / max(1, sum(r.drafted for r in results))
    per_step = statistics.mean(r.tokens_per_step for r in results)

    units = [{"greedy b1": (lambda p=p: greedy(p[None])), "bx b1": (lambda p=p: ours(p[None])),
              "hf-early-exit b1": (lambda p=p: hf_early(p[None]))} for p in prompts]
    times = interleaved(units, repeats=args.repeats)
    b = f"b{n_prompts}"  # every prompt in one batch (8 in the full setting)
    times8 = interleaved([{f"greedy {b}": lambda: greedy(prompts), f"bx {b}": lambda: ours(prompts)}],
                         repeats=args.repeats)
    times.update(times8)
    tokens = n_prompts * new
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{n_prompts} held-out prompts of 64 bytes, {new} new tokens each, draft_tokens={d}, "
          f"{args.threads} thread(s), median of {args.repeats} interleaved repeats")
    print(f"{'variant':<20} {'tokens/s':>9} {'vs greedy':>10}")
    for name in ("greedy b1", "bx b1", "hf-early-exit b1", f"greedy {b}", f"bx {b}"):
        base = median[f"greedy {b}" if name.endswith(b) else "greedy b1"]
        print(f"{name:<20} {tokens / median[name]:9.1f} {base / median[name]:9.2f}x")
    print(f"\nbx.generate: acceptance {accepted:.1%}, {per_step:.2f} tokens per verification step (batch 1); "
          f"batch {n_prompts}: acceptance {batched.accepted:.1%}, {batched.tokens_per_step:.2f} tokens per step")
    # two ceilings on the speedup, from the step's shape: greedy runs all layers once per token; a step of bx runs
    # d + 1 one-token calls through the exit's k layers, then one (d + 1)-token call through the rest
    for label, tps in (("batch 1", per_step), (f"batch {n_prompts}", batched.tokens_per_step)):
        calls = layers * tps / ((d + 1) * exit_layer + (layers - exit_layer))
        print(f"ceilings at {label}: {calls:.2f}x if time were per layer call (overhead-bound), "
              f"{tps / (d + 1):.2f}x if per token through a layer (compute-bound)")
    print(f"identical to greedy: bx batch 1 {same1}/{n_prompts}, bx batch {n_prompts} {same8}/{n_prompts}, "
          f"hf-early-exit {same_hf}/{n_prompts}")
    print(f"load after: {uptime()}")


if __name__ == "__main__":
    main()
