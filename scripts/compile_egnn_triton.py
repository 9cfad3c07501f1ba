"""Compile the fused EGNN Triton kernels ahead of time for sm_90 (no GPU needed) and report resources.

For every shipped configuration (hidden size, dtype, edge term, flags, pass) this compiles the
kernel with the launcher's own block sizes and warps, runs the bundled ``ptxas -v`` on the PTX
for registers and spills, and checks that ``tl.dot`` became tensor-core instructions (wgmma or
mma) and that shared memory fits the 227 KB an H100 block may use.

    python scripts/compile_egnn_triton.py [--quick] [--json OUT]

Exit status 1 if any configuration fails to compile, spills, overflows shared memory or lacks
tensor-core instructions. Must run without TRITON_INTERPRET (a real compile).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: this script compiles for a real GPU target")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from protdiff_fast.ops import egnn_triton as et  # noqa: E402

SHARED_LIMIT = 232448  # bytes of shared memory one H100 block can use (227 KB)
TYPES = {"fp32": "fp32", "bf16": "bf16"}


def _signature(kernel, dtype: str, pass_: str, coords32: bool = False):
    ptr = f"*{dtype}"
    f32 = "*fp32"
    names = list(kernel.arg_names)
    sig = {}
    for name in names:
        if coords32 and name in ("x_ptr", "dx_out_ptr"):  # float32 coordinates next to bf16 features (autocast)
            sig[name] = f32
        elif name in ("x_ptr", "p_ptr", "q_ptr", "w_d_ptr", "W2_ptr", "b2_ptr", "W3_ptr", "b3_ptr", "w4_ptr",
                    "ea_ptr", "We_ptr", "rel_ptr", "watt_ptr", "dx_out_ptr", "dea_ptr", "stage_ptr"):
            sig[name] = ptr
        elif name == "scratch_ptr" and pass_ == "fwd":  # the forward's m copy, in the weights' dtype
            sig[name] = ptr
        elif name == "mask_ptr":
            sig[name] = "*u8"
        elif name.endswith("_ptr"):
            sig[name] = f32
        elif name in ("N", "E", "K", "own_chunk", "other_chunk", "n_other_chunks", "n_regions"):
            sig[name] = "i32"
        elif name in ("eps", "b_att"):
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    return sig


def _attrs(kernel, sig):
    # what a real launch infers: pointers 16-byte aligned (torch allocations), N divisible by 16 at large N
    idx = [k for k, name in enumerate(kernel.arg_names) if sig[name].startswith("*") or name == "N"]
    return {(k,): [["tt.divisibility", 16]] for k in idx}


def compile_rel_sum(H):
    """The offset-table gradient's window sum (_rel_windows_kernel): no tl.dot, checked for compiling,
    registers and spills."""
    kernel = et._rel_windows_kernel
    sig = {n: "*fp32" if n.endswith("_ptr") else ("constexpr" if n in ("H", "BLOCK_O", "HE") else "i32")
           for n in kernel.arg_names}
    attrs = {(k,): [["tt.divisibility", 16]] for k, n in enumerate(kernel.arg_names) if n.endswith("_ptr")}
    cols = H if H in et.SUPPORTED_HIDDEN else et.RECT_K_CHUNK  # as _rel_gradient launches it
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=dict(H=cols, BLOCK_O=et.REL_SUM_BLOCK, HE=H),
                                    attrs=attrs)
    return src, et.REL_SUM_WARPS


def compile_slab(H, dtype, edge, attention, tanh, normalize, config=None, coords32=False):
    """The row-slab backward's pair map (protdiff_fast/ops/egnn_triton_slab.py, PROTDIFF_FAST_TRITON_BWD=slab)."""
    import torch

    from protdiff_fast.ops import egnn_triton_slab as slab
    torch_dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
    if os.environ.get("SLAB_CHUNKS"):  # "K,N": for sweeps
        os.environ["PROTDIFF_FAST_TRITON_SLAB_CHUNKS"] = os.environ["SLAB_CHUNKS"]
    kc, nc = slab.slab_chunks(H, torch_dtype)
    chunked = (kc, nc) != (H, H)
    kernel = slab._egnn_bwd_slab_chunked_kernel if chunked else slab._egnn_bwd_slab_kernel
    BI, BJ, warps = config or slab.slab_blocks(H)
    ptr = f"*{dtype}"
    sig = {}
    for name in kernel.arg_names:
        if name == "x_ptr":
            sig[name] = "*fp32" if coords32 else ptr
        elif name in ("p_ptr", "q_ptr", "w_d_ptr", "W2_ptr", "b2_ptr", "W3_ptr", "b3_ptr", "w4_ptr", "ea_ptr", "We_ptr",
                      "rel_ptr", "watt_ptr", "a_ptr", "m_ptr", "dt_ptr", "dr_ptr", "dz_ptr"):
            sig[name] = ptr
        elif name == "mask_ptr":
            sig[name] = "*u8"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in ("N", "E", "K", "i0", "SI", "TILES"):
            sig[name] = "i32"
        elif name in ("eps", "b_att"):
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    consts = dict(H=H, EP=16, BI=BI, BJ=BJ, EDGE=edge, ATTENTION=attention, TANH=tanh, NORMALIZE=normalize,
                  PRECISION=et._precision(torch_dtype), PRECISION_BWD=et._precision(torch.float32) if dtype == "fp32"
                  else "tf32", UPCAST=False, FAST=dtype != "fp32", BWD_LOWP=slab.slab_bwd_lowp(torch_dtype))
    if chunked:
        consts.update(K_CHUNK=kc, N_CHUNK=nc)
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=_attrs(kernel, sig))
    rec = dict(H=H, dtype=dtype + ("+x32" if coords32 else ""), edge=["none", "dense", "offset"][edge],
               attention=attention, tanh=tanh, normalize=normalize, kernel="slab", block_i=BI, block_j=BJ,
               num_warps=warps, known_spill=attention and (H, dtype == "fp32") in slab.SLAB_KNOWN_SPILLS)
    if chunked:
        rec["chunks"] = [kc, nc]
    return _finish(rec, src, warps, needs_dot=True, num_stages=1)


def compile_rect(widths, dtype, edge, attention, tanh, normalize, pass_, coords32=False):
    """The chunked forward / one-pass backward at rectangular widths (HE, HM, HX), as the launchers run them
    (rect_fwd_config / rect_bwd_config)."""
    import torch
    HE, HM, HX = widths
    torch_dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
    if pass_ == "fwd":
        BI, BJ, warps, kc, nc = et.rect_fwd_config(HM, HX, torch_dtype)
        kernel = et._egnn_fwd_kernel
    else:
        BI, BJ, warps, kc, nc = et.rect_bwd_config(HM, HX, torch_dtype)
        kernel = et._egnn_bwd_chunked_kernel
    if os.environ.get("RECT_BLOCKS"):  # "BI,BJ,WARPS": for sweeps
        BI, BJ, warps = (int(v) for v in os.environ["RECT_BLOCKS"].split(","))
    if os.environ.get("RECT_CHUNKS"):  # "K,N": for sweeps
        kc, nc = (int(v) for v in os.environ["RECT_CHUNKS"].split(","))
    sig = _signature(kernel, dtype, pass_, coords32)
    consts = dict(HE=HE, HM=HM, HX=HX, EP=16, BI=BI, BJ=BJ, EDGE=edge, ATTENTION=attention, TANH=tanh,
                  NORMALIZE=normalize, PRECISION=et._precision(torch_dtype), UPCAST=False,
                  FAST=bool(int(os.environ.get("FAST", "1"))) and dtype != "fp32", K_CHUNK=kc, N_CHUNK=nc)
    if pass_ == "fwd":
        consts.update(M_SCRATCH=et.rect_m_scratch(HM, torch_dtype), CHUNKED=True)
        stages = et.NUM_STAGES
    else:
        consts.update(HS=max(widths), HX_CHUNK=et.hx_chunk(HX, nc), W_REL=triton.next_power_of_2(BI + BJ - 1), NEED_DEA=edge == 1,
                      PRECISION_BWD=et._precision(torch.float32) if dtype == "fp32" else "tf32",
                      DW_STAGE=et.dw_stage(HM, torch_dtype), FLUSH_ROWS=et.BWD_CHUNKED_FLUSH_ROWS)
        stages = et.bwd_chunked_stages()
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=_attrs(kernel, sig))
    rec = dict(H="x".join(map(str, widths)), widths=list(widths), dtype=dtype + ("+x32" if coords32 else ""),
               edge=["none", "dense", "offset"][edge], attention=attention, tanh=tanh, normalize=normalize,
               kernel=pass_, block_i=BI, block_j=BJ, num_warps=warps, chunks=[kc, nc],
               known_spill=(HM, dtype == "fp32", pass_) in et.RECT_KNOWN_SPILLS)
    return _finish(rec, src, warps, needs_dot=True, num_stages=stages)


def compile_one(H, dtype, edge, attention, tanh, normalize, pass_, config=None, coords32=False):
    import torch
    if pass_ == "rel_sum":  # (rectangular: the windows are HE wide)
        HE = H[0] if isinstance(H, tuple) else H
        src, warps = compile_rel_sum(HE)
        rec = dict(H=HE, dtype="fp32", edge="offset", attention=False, tanh=False, normalize=False, kernel=pass_,
                   block_i=et.REL_SUM_BLOCK, block_j=1, num_warps=warps, known_spill=False)
        return _finish(rec, src, warps, needs_dot=False)
    if isinstance(H, tuple):  # rectangular widths (HE, HM, HX)
        return compile_rect(H, dtype, edge, attention, tanh, normalize, pass_, coords32)
    if pass_ == "slab":
        return compile_slab(H, dtype, edge, attention, tanh, normalize, config, coords32)
    BI, BJ, warps = config or et.block_sizes(H, getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]), pass_,
                                             edge)
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    # the one-pass backward at H = 256 runs the chunked kernel (bwd_chunks; BWD_CHUNKS="K,N" in the
    # environment sets them, as the launcher reads PROTDIFF_FAST_TRITON_BWD_CHUNKS)
    if os.environ.get("BWD_CHUNKS"):
        os.environ["PROTDIFF_FAST_TRITON_BWD_CHUNKS"] = os.environ["BWD_CHUNKS"]
    bwd_kc, bwd_nc = et.bwd_chunks(H, getattr(torch, torch_dtype))
    chunked_bwd = (pass_ == "bwd_i" and et.bwd_passes(H, getattr(torch, torch_dtype)) == 1
                   and (bwd_kc, bwd_nc) != (H, H))
    kernel = et._egnn_fwd_kernel if pass_ == "fwd" else (et._egnn_bwd_chunked_kernel if chunked_bwd
                                                          else et._egnn_bwd_kernel)
    sig = _signature(kernel, dtype, pass_, coords32)
    consts = dict(H=H, EP=16, BI=BI, BJ=BJ, EDGE=edge, ATTENTION=attention, TANH=tanh, NORMALIZE=normalize,
                  PRECISION=et._precision(getattr(torch, torch_dtype)), UPCAST=False,
                  FAST=bool(int(os.environ.get("FAST", "1"))) and dtype != "fp32")
    if pass_ == "fwd" or chunked_bwd:  # the kernels that also take rectangular widths: H -> (HE, HM, HX)
        consts.pop("H")
        consts.update(HE=H, HM=H, HX=H)
    if pass_ == "fwd":  # K_CHUNK / N_CHUNK from the environment ("32,64"): for sweeps
        env_chunks = os.environ.get("FWD_CHUNKS")
        kc, nc = (int(v) for v in env_chunks.split(",")) if env_chunks else et.fwd_chunks(H, getattr(torch, torch_dtype), x32=coords32)
        env_scratch = os.environ.get("FWD_M_SCRATCH")  # "1" / "0": for sweeps
        consts.update(K_CHUNK=kc, N_CHUNK=nc,
                      M_SCRATCH=bool(int(env_scratch)) if env_scratch else et.fwd_m_scratch(H, getattr(torch, torch_dtype), coords32),
                      CHUNKED=kc * nc < H * H)
    if pass_ != "fwd":
        consts.update(W_REL=triton.next_power_of_2(BI + BJ - 1), ROWS_ARE_I=pass_ == "bwd_i",
                      NEED_DEA=edge == 1,  # DW_CHUNK from the environment: for sweeps
                      DW_CHUNK=int(os.environ.get("DW_CHUNK", et.dw_chunk(H, getattr(torch, torch_dtype), pass_))),
                      PRECISION_BWD=et._precision(torch.float32) if dtype == "fp32" else "tf32",
                      DW_STAGE=et.dw_stage(H, getattr(torch, torch_dtype)), FLUSH_ROWS=et.flush_rows(H),
                      BOTH=pass_ == "bwd_i" and et.bwd_passes(H, getattr(torch, torch_dtype)) == 1)
        if chunked_bwd:  # the chunked kernel: always both sides, rows i, staged weight gradients
            for name in ("ROWS_ARE_I", "DW_CHUNK", "BOTH"):
                consts.pop(name)
            consts.update(K_CHUNK=bwd_kc, N_CHUNK=bwd_nc, HS=H, HX_CHUNK=H,
                          FLUSH_ROWS=int(os.environ.get("FLUSH_ROWS", et.BWD_CHUNKED_FLUSH_ROWS)))
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=_attrs(kernel, sig))
    rec = dict(H=H, dtype=dtype + ("+x32" if coords32 else ""), edge=["none", "dense", "offset"][edge], attention=attention, tanh=tanh,
               normalize=normalize, kernel=pass_, block_i=BI, block_j=BJ, num_warps=warps,
               known_spill=(H, dtype == "fp32", pass_, *(("x32",) if coords32 else ())) in et.KNOWN_SPILLS
               or (H, dtype == "fp32", pass_) in et.KNOWN_SPILLS)
    if chunked_bwd:
        rec["chunks"] = [bwd_kc, bwd_nc]
    stages = int(os.environ.get("NUM_STAGES", et.bwd_chunked_stages() if chunked_bwd else et.NUM_STAGES))
    return _finish(rec, src, warps, needs_dot=True, num_stages=stages)


def _finish(rec, src, warps, needs_dot, num_stages=None):
    rec["needs_dot"] = needs_dot
    try:
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps,
                                     "num_stages": et.NUM_STAGES if num_stages is None else num_stages})
    except Exception as err:  # noqa: BLE001 - reported, and the run fails
        rec.update(ok=False, error=f"{type(err).__name__}: {str(err)[:400]}")
        return rec
    ptx = ck.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(ptx)
    proc = subprocess.run([triton.knobs.nvidia.ptxas.path, "-v", "--gpu-name=sm_90a", fh.name, "-o", os.devnull],
                          capture_output=True, text=True)
    os.unlink(fh.name)
    out = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    rec.update(
        registers=int(regs.group(1)) if regs else None,
        spill_store_bytes=int(spill.group(1)) if spill else None,
        spill_load_bytes=int(spill.group(2)) if spill else None,
        shared_bytes=int(ck.metadata.shared),
        wgmma=ptx.count("wgmma.mma_async"), mma=len(re.findall(r"\bmma\.sync", ptx)),
        ptxas_warnings=sorted(set(re.findall(r"C\d{4}", out))),
        ptxas_ok=proc.returncode == 0,
    )
    rec["ok"] = bool(rec["ptxas_ok"] and (rec["spill_store_bytes"] == 0 or rec["known_spill"])
                     and rec["shared_bytes"] <= SHARED_LIMIT and (rec["wgmma"] + rec["mma"] > 0 or not needs_dot))
    return rec


def _compile_args(cfg):
    """cfg: (H, dtype, edge, attention, tanh, normalize, pass[, "x32"]): "x32" = float32 coordinates."""
    return compile_one(*cfg[:7], coords32=cfg[7:] == ("x32",))


def configs(quick: bool, ci: bool = False, rect: bool = False):
    if ci:  # what the test suite compiles: the spill-free forward sizes, and one backward pair
        for H in (16, 32, 64):
            yield H, "bf16", 2, True, True, True, "fwd"
        yield 32, "fp32", 1, True, False, True, "fwd"
        yield 128, "bf16", 2, True, True, True, "fwd"  # the GPU target's size
        yield 128, "bf16", 2, False, False, True, "fwd"  # ... with ProtDiff's flags (its own block config)
        yield 128, "bf16", 0, False, False, False, "fwd"
        yield 256, "bf16", 2, True, True, True, "fwd"  # ProtDiff's published size (chunked products)
        yield 128, "fp32", 2, False, False, True, "fwd"  # fp32 with ProtDiff's flags: chunked, 3xTF32 on wgmma
        yield 256, "fp32", 1, True, False, True, "fwd"  # fp32 at ProtDiff's size: m read back from scratch
        yield 32, "bf16", 2, True, True, True, "bwd_i"
        yield 32, "bf16", 2, True, True, True, "bwd_j"
        yield 256, "bf16", 2, True, True, True, "bwd_i"  # the chunked one-pass backward (known spill: 36 B)
        yield 256, "bf16", 2, False, False, True, "bwd_i"  # ... with ProtDiff's flags: no spill
        yield 256, "fp32", 2, False, False, True, "bwd_i"  # fp32 at H = 256: fused only since it is chunked
        yield 256, "bf16", 2, True, True, True, "bwd_j"  # the two-pass scheme's rows-j pass (known spill)
        yield 256, "fp32", 2, False, False, False, "rel_sum"
        yield 128, "bf16", 2, False, False, True, "slab"  # the row-slab backward (PROTDIFF_FAST_TRITON_BWD=slab)
        yield 128, "bf16", 2, False, False, True, "slab", "x32"
        yield 64, "fp32", 2, True, True, True, "slab"
        yield 256, "bf16", 2, False, False, True, "slab"  # ... with the weights by chunks
        yield 128, "fp32", 2, False, False, True, "slab"
        yield 128, "bf16", 2, False, False, True, "fwd", "x32"  # autocast at the GPU target's size (chunked)
        for pass_ in ("fwd", "bwd_i", "bwd_j"):  # ProtDiff's layer under autocast: bf16, float32 coordinates
            yield 256, "bf16", 2, False, False, True, pass_, "x32"
        for pass_ in ("fwd", "bwd_i", "bwd_j", "slab"):  # normalize="clamp" (NORMALIZE 2): egnn-pytorch's drop-in
            yield 32, "bf16", 1, True, True, 2, pass_
        yield 128, "bf16", 1, True, False, 2, "fwd"
        for pass_ in ("fwd", "bwd_i"):  # rectangular widths (egnn-pytorch's layer at dim 64 / 32)
            yield (272, 64, 272), "bf16", 0, False, False, 2, pass_  # (norm_coors: H_x = 4 m_dim + 1)
            yield (144, 16, 64), "fp32", 1, True, False, 2, pass_
        yield (272, 64, 256), "fp32", 0, False, False, False, "rel_sum"
        return
    if rect:  # rectangular widths only: egnn-pytorch's shapes with its options, and one offset-table set
        for widths, dtype, pass_ in itertools.product(et.RECT_WIDTHS, ("fp32", "bf16"), ("fwd", "bwd_i")):
            for edge, att, tanh, norm in [(0, False, False, 0), (0, False, False, 2), (1, True, False, 2),
                                          (2, True, True, 1)]:
                yield widths, dtype, edge, att, tanh, norm, pass_
        for widths in et.RECT_WIDTHS:
            yield widths, "fp32", 2, False, False, False, "rel_sum"
        return
    hs = (32, 128) if quick else et.SUPPORTED_HIDDEN
    for H, dtype, pass_ in itertools.product(hs, ("fp32", "bf16"), ("fwd", "bwd_i", "bwd_j")):
        if (H, dtype == "fp32", pass_) not in et._CONFIGS:
            continue  # no fused backward here (fp32 at H = 256: the reference recomputes the gradients)
        # no edge term and no flags; every flag with the offset table; dense edges; ProtDiff's own layer
        # (offset table, normalize, no attention, no tanh)
        flag_sets = [(0, False, False, False), (2, True, True, True), (1, True, False, True), (2, False, False, True)]
        if quick:
            flag_sets = flag_sets[1:]
        for edge, att, tanh, norm in flag_sets:
            yield H, dtype, edge, att, tanh, norm, pass_
    for H, pass_ in itertools.product(hs, ("fwd", "bwd_i", "bwd_j")):  # ProtDiff's layer under autocast
        yield H, "bf16", 2, False, False, True, pass_, "x32"
    for H in hs:
        yield H, "fp32", 2, False, False, False, "rel_sum"
    import torch

    from protdiff_fast.ops import egnn_triton_slab as slab
    for H, dtype in itertools.product(hs, ("fp32", "bf16")):  # the row-slab backward where it fits
        if H <= slab.SLAB_MAX_HIDDEN[{"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]]:
            for edge, att, tanh, norm in [(0, False, False, False), (2, True, True, True), (1, True, False, True),
                                          (2, False, False, True)]:
                yield H, dtype, edge, att, tanh, norm, "slab"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset (H 32 and 128, two flag sets)")
    ap.add_argument("--ci", action="store_true", help="the few configurations the test suite compiles")
    ap.add_argument("--rect", action="store_true", help="rectangular widths only (egnn-pytorch's shapes)")
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--markdown", help="write a table here")
    ap.add_argument("--jobs", type=int, default=1, help="compile this many configurations at once (processes)")
    args = ap.parse_args(argv)
    records = []
    header = (f"{'kernel':<6} {'H':>4} {'dtype':<8} {'edge':<7} {'att':<5} {'BIxBJ':<6} {'warps':>5} {'regs':>5} "
              f"{'spill':>6} {'smem':>7} {'wgmma':>6} {'mma':>4}  ok")
    print(header, flush=True)
    lines = []
    cfgs = list(configs(args.quick, args.ci, args.rect))
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        pool = ProcessPoolExecutor(args.jobs)
        results = pool.map(_compile_args, cfgs)  # in order
    else:
        results = map(_compile_args, cfgs)
    for r in results:
        records.append(r)
        if "error" in r:
            print(f"{r['kernel']:<6} {r['H']:>4} {r['dtype']:<8} {r['edge']:<7} FAILED {r['error']}", flush=True)
            continue
        line = (f"{r['kernel']:<6} {r['H']:>4} {r['dtype']:<8} {r['edge']:<7} {str(r['attention']):<5} "
                f"{r['block_i']}x{r['block_j']:<4} {r['num_warps']:>5} {r['registers']:>5} {r['spill_store_bytes']:>6} "
                f"{r['shared_bytes']:>7} {r['wgmma']:>6} {r['mma']:>4}  "
                f"{('ok' + (' (known spill)' if r['known_spill'] and r['spill_store_bytes'] else '')) if r['ok'] else 'FAIL'}"
                f" {' '.join(r['ptxas_warnings'])}")
        lines.append(line)
        print(line, flush=True)
    meta = dict(triton=triton.__version__, target="sm_90a", records=records)
    if args.markdown:
        import subprocess as sp
        commit = sp.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        with open(args.markdown, "w") as fh:
            fh.write(f"# Fused EGNN Triton kernels compiled for sm_90a (no GPU)\n\ntriton {triton.__version__}, "
                     f"commit {commit}, command: `python scripts/compile_egnn_triton.py "
                     f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                     "Registers and spill stores per thread from the bundled ptxas -v; smem = bytes of shared "
                     "memory (limit 232448); wgmma/mma = tensor-core instructions in the PTX. edge: none | "
                     "dense edge_attr | offset table; flags as (attention, tanh, normalize) = the att column. "
                     f"bwd_i is the {'one-pass backward (both sides)' if et.BWD_PASSES == 1 else 'rows-i pass'}; "
                     "bwd_j the rows-j pass, run only with two passes (PROTDIFF_FAST_TRITON_BWD_PASSES=2); slab the "
                     "row-slab backward's pair map (PROTDIFF_FAST_TRITON_BWD=slab).\n\n"
                     "```\n" + header + "\n" + "\n".join(lines) + "\n```\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(meta, fh, indent=1)
    bad = [r for r in records if not r["ok"]]
    print(f"{len(records) - len(bad)}/{len(records)} configurations ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
