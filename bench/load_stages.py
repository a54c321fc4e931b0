"""Where a warm load's time goes in kvtier's own ``Loader`` (kvtier.tiers.pipeline), on CUDA.

    python bench/load_stages.py

63 blocks of a 16K-token Llama-8B prompt (bf16 [32, 2, 8, 256, 128] chunks) per codec, serialized as a warm
shard holds them, loaded from ordinary host arrays (no Ray: the tier's fetch is not in these figures) with
4/8/16 threads and runs of 16/64 MiB, stage only (copy + hash + H2D) and with decode; then the calling
thread's time in decode, and one thread's copy-to-pinned, XXH3-128 and pinned H2D rates as floors. Prints
one line per measurement (median of 5); bench/results/e2e-h200-16k.md quotes a run of it.
"""
import os, sys, time, statistics
import numpy as np, torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():
    sys.exit("bench/load_stages.py measures the CUDA load path: it needs a GPU")
import kvtier
from kvtier.tiers.pipeline import Loader

def med(f, reps=5):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize(); t = time.perf_counter(); f(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3

shape = (32, 2, 8, 256, 128)
n = 63
g = torch.Generator(device="cuda").manual_seed(0)
for codec in ("rot4", "x5", "none"):
    keys = [f"{i:032x}" for i in range(n)]
    arrs = []
    for k in keys:
        kv = torch.randn(shape, device="cuda", generator=g, dtype=torch.float32).to(torch.bfloat16)
        arrs.append(np.frombuffer(kvtier.compress(kv, codec, key=k, model_id="m").to_arrow(), dtype=np.uint8).copy())
    mb = sum(a.nbytes for a in arrs) / 1e6
    for threads in (4, 8, 16):
        for group in (16, 64):
            L = Loader(threads, group_bytes=group << 20)
            L.load(keys, arrs, "cuda")  # warm-up
            for decode in (False, True):
                ms = med(lambda: L.load(keys, arrs, "cuda", decode=decode))
                print(f"{codec:6s} threads {threads:2d} group {group:3d} MiB decode {decode!s:5s}: {ms:7.1f} ms  {mb / ms:6.1f} GB/s", flush=True)
            if threads == 16 and group == 64:  # the calling thread's share: time inside _finish (decode)
                spent = []
                orig = L._finish
                def timed(*a, **k):
                    t = time.perf_counter(); r = orig(*a, **k); spent.append(time.perf_counter() - t); return r
                L._finish = timed
                ms = med(lambda: L.load(keys, arrs, "cuda"), reps=3)
                print(f"{codec:6s} calling thread in _finish: {sum(spent) / 3 * 1e3:.1f} ms of {ms:.1f} ms per load", flush=True)
            L.close()
    # plain copies: numpy copy to pinned, pinned H2D
    pinned = torch.empty(sum(a.nbytes for a in arrs), dtype=torch.uint8, pin_memory=True)
    def cp():
        off = 0
        for a in arrs:
            np.copyto(pinned.numpy()[off:off + a.nbytes], a); off += a.nbytes
    print(f"{codec:6s} one-thread copy to pinned: {mb / med(cp):.1f} GB/s", flush=True)
    import xxhash
    def hs():
        for a in arrs:
            xxhash.xxh3_128(a).digest()
    print(f"{codec:6s} one-thread xxh3_128: {mb / med(hs):.1f} GB/s", flush=True)
    d = torch.empty_like(pinned, device="cuda")
    print(f"{codec:6s} pinned H2D: {mb / med(lambda: d.copy_(pinned, non_blocking=True)):.1f} GB/s", flush=True)
